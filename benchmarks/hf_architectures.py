"""Per HF architecture: what fxsp rewrites and what it sends, against eager TP.

    torchrun --nproc-per-node 2 benchmarks/hf_architectures.py [--layers 4] [--seq 13]

Each architecture is a tiny random model (`fxsp.testing.hf.tiny_model`) parallelised with its own
TP plan through DTensor, compiled with fxsp (Inductor), run on [2, seq] tokens. Rank 0 prints a
table: SP sites rewritten per layer, sums of all-reduces folded, the bytes each rank sends per
forward with plain TP and with fxsp (ring algorithms), and the largest |fxsp - eager| of the
logits over all ranks.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import fxsp
from fxsp.testing.hf import parallelize, tiny_model

ARCHITECTURES = {
    "Llama (RMSNorm)": ("llama", {}),
    "GPT-NeoX, sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "GPT-NeoX, parallel": ("gpt_neox", {"use_parallel_residual": True}),
    "Phi": ("phi", {"partial_rotary_factor": 0.5}),
    "Cohere": ("cohere", {}),
    "GPT-J": ("gptj", {"rotary_dim": 4}),
    "Nemotron (1 + w)": ("nemotron", {}),
    "OLMo (no weight)": ("olmo", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=13)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for name, (model_type, config) in ARCHITECTURES.items():
        torch._dynamo.reset()
        model = parallelize(tiny_model(model_type, num_hidden_layers=args.layers, **config), mesh)
        backend = fxsp.backend(mesh)
        ids = torch.randint(3, 128, (2, args.seq), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, got = model(ids).logits, torch.compile(model, backend=backend)(ids).logits
        error = torch.tensor((got - want).abs().max().item())
        dist.all_reduce(error, op=dist.ReduceOp.MAX)
        counts: dict = {}
        for report in backend.reports:
            for k, v in report.counts.items():
                if v and k.startswith(("sp.", "fold.")):
                    counts[k] = counts.get(k, 0) + v
        sites = sum(v for k, v in counts.items() if k.startswith("sp."))
        before = sum(r.traffic_before.sent_per_rank(world) for r in backend.reports)
        after = sum(r.traffic_after.sent_per_rank(world) for r in backend.reports)
        rewrites = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        rows.append((name, sites / args.layers, rewrites, before, after, error.item()))
    if dist.get_rank() == 0:
        print(f"TP {world}, {args.layers} layers, [2, {args.seq}] tokens, hidden 48, fp32")
        print(
            "| architecture | SP sites per layer | rewrites | sent per rank, TP | with fxsp "
            "| max abs diff |"
        )
        print("|---|---:|---|---:|---:|---:|")
        for name, per_layer, rewrites, before, after, error in rows:
            print(
                f"| {name} | {per_layer:.2f} | {rewrites} | {before / 1024:.1f} KiB "
                f"| {after / 1024:.1f} KiB ({after / before:.2f}x) | {error:.2g} |"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
