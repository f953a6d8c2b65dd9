"""An HF causal LM, tensor-parallel with its own TP plan, compiled with fxsp on every rank.

    torchrun --nproc-per-node 2 examples/hf_tp.py [--model-type gpt_neox] [--checkpoint DIR]
        [--plan plan.json] [--batch 2] [--seq 13] [--set use_parallel_residual=false]

By default it makes a tiny random model of `--model-type` locally (no download); `--checkpoint`
loads a local one instead. The model's `base_model_tp_plan` (or `--plan`, a JSON file of module
name pattern -> "colwise" / "rowwise", for models that ship none) is applied with DTensor's
`parallelize_module`, as transformers' `tp_plan="auto"` does. It prints, per compiled graph,
the rewrites fxsp made and the collective bytes before and after, then the largest difference
from the eager model over all ranks. GPUs over NCCL when there is one per rank, else CPU over
gloo.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import fxsp
from fxsp.testing.hf import parallelize, tiny_model
from fxsp.testing.launch import init_torchrun


def config_value(text: str):
    """`--set key=value`: JSON where it parses (numbers, true / false), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-type", default="gpt_neox", help="an HF model_type (tiny model)")
    parser.add_argument("--checkpoint", help="a local checkpoint directory instead")
    parser.add_argument("--plan", help="a JSON TP plan, for models that ship none")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=13, help="need not divide by TP")
    parser.add_argument("--set", action="append", default=[], help="config key=value (tiny)")
    args = parser.parse_args()

    rank, world, device, where = init_torchrun()

    if args.checkpoint:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    else:
        overrides = dict(kv.split("=", 1) for kv in args.set)
        model = tiny_model(args.model_type, **{k: config_value(v) for k, v in overrides.items()})
    plan = json.load(open(args.plan)) if args.plan else None
    model = parallelize(model.to(device), init_device_mesh(device.type, (world,)), plan)

    backend = fxsp.backend(None)
    compiled = torch.compile(model, backend=backend)
    vocab = model.config.vocab_size
    ids = torch.randint(
        0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(device)
    with torch.no_grad():
        want, got = model(ids).logits, compiled(ids).logits
    error = torch.tensor((got.float() - want.float()).abs().max().item(), device=device)
    dist.all_reduce(error, op=dist.ReduceOp.MAX)

    if rank == 0:
        name = type(model).__name__
        print(f"{name}: {world} ranks, {where}, [{args.batch}, {args.seq}] tokens")
        for i, report in enumerate(backend.reports):
            done = ", ".join(f"{k}={v}" for k, v in report.counts.items() if v and "." in k)
            print(f"graph {i}: {done or 'nothing rewritten'}")
            print(f"  collective payload: {report.traffic_before} before,")
            print(f"                      {report.traffic_after} after")
            print(
                f"  sent per rank: {report.traffic_before.sent_per_rank(world):.0f} B before, "
                f"{report.traffic_after.sent_per_rank(world):.0f} B after"
            )
            for rule, near in report.misses.items():
                if (
                    rule.startswith("sp.")
                    and near.anchor != "-"
                    and report.traffic_after.bytes.get("all_reduce")
                ):
                    print("  left alone:", near)
        print(f"max |fxsp - eager| over all ranks: {error.item():.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
