"""`make demo`: a tensor-parallel Llama-style model compiled with fxsp on every rank.

    torchrun --nproc-per-node 2 examples/tp_llama.py [--rows N] [--layers N] [--fp8]

Runs on CPU over gloo (NCCL on GPUs), compares against the eager model on every rank, and
prints what fxsp rewrote, the best near-misses, and what SP changes per layer: collective
bytes, norm rows and residual rows per rank.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import fxsp
from fxsp.testing.tp_llama import Spec, TPLlama


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=37, help="tokens in the batch (need not divide by TP)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--fp8", action="store_true", help="static FP8 quant after every layer norm")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))

    spec = Spec(layers=args.layers, hidden=96, heads=6, inter=192, vocab=96, fp8=args.fp8)
    model = TPLlama(spec).to(device)
    backend = fxsp.backend(None)
    compiled = torch.compile(model, backend=backend)
    tokens = model.example_input(args.rows).to(device)
    with torch.no_grad():
        reference, result = model(tokens), compiled(tokens)
    error = torch.tensor((result.float() - reference.float()).abs().max().item(), device=device)
    dist.all_reduce(error, op=dist.ReduceOp.MAX)

    if rank == 0:
        report = backend.reports[-1]
        print(f"fxsp demo: {world} ranks, {args.layers} layers, {args.rows} rows, hidden {spec.hidden}, {device.type}")
        print("rules applied:", ", ".join(f"{k}={v}" for k, v in report.counts.items() if v) or "none")
        print("best near-misses (rules with candidates that did not match):")
        for near in report.misses.values():
            if near.anchor != "-":
                print("  ", near)
        print("per all-reduce site, per rank:")
        print(f"  without SP: {report.traffic_before.per_layer(world)}")
        print(f"  with SP:    {report.traffic_after.per_layer(world)}")
        print(f"max |fxsp - eager| over all ranks: {error.item():.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
