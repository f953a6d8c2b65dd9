"""`make demo`: a tensor-parallel Llama-style model compiled with fxsp on every rank.

    torchrun --nproc-per-node 2 examples/tp_llama.py [--rows N] [--layers N] [--fp8]
        [--min-tokens N]

Runs on GPUs over NCCL when there is one per rank, else on CPU over gloo (and says so). Compares
against the eager model on every rank, and prints what sequence parallelism did: one layer's
all-reduce → norm before and after the rewrite (reduce-scatter → norm on this rank's rows →
all-gather), the rules applied, the collective bytes, norm rows and residual rows per rank, and
the largest difference from eager. Near-misses are printed only when some all-reduce stayed.
A second run over a warm Inductor cache prints the same, from the report fxsp saved with the
compiled graph.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import fxsp
from fxsp.testing.launch import init_torchrun
from fxsp.testing.tp_llama import Spec, TPLlama


def one_site(golden: str, collective: str, index: int) -> list[str]:
    """The golden lines of one all-reduce site, from the matmul that feeds the `index`-th line
    naming `collective` to the next matmul, which reads the normed rows."""
    lines = golden.splitlines()
    found = [i for i, line in enumerate(lines) if collective in line]
    if not found:
        return []
    at = found[min(index, len(found) - 1)]
    start = max((i for i in range(at) if "aten.mm." in lines[i]), default=at)
    end = next((i for i in range(at + 1, len(lines)) if "aten.mm." in lines[i]), len(lines) - 1)
    return lines[start : end + 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--rows", type=int, default=37, help="tokens in the batch (need not divide by TP)"
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--fp8", action="store_true", help="static FP8 quant after every layer norm"
    )
    parser.add_argument(
        "--min-tokens",
        type=int,
        default=None,
        help="SP only from this many rows (default: fxsp's threshold for the device)",
    )
    args = parser.parse_args()

    rank, world, device, where = init_torchrun()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))

    spec = Spec(layers=args.layers, hidden=96, heads=6, inter=192, vocab=96, fp8=args.fp8)
    model = TPLlama(spec).to(device)
    backend = (
        fxsp.backend(None)
        if args.min_tokens is None
        else fxsp.backend(None, min_tokens=args.min_tokens)
    )
    compiled = torch.compile(model, backend=backend)
    tokens = model.example_input(args.rows).to(device)
    with torch.no_grad():
        reference, result = model(tokens), compiled(tokens)
    error = torch.tensor((result.float() - reference.float()).abs().max().item(), device=device)
    dist.all_reduce(error, op=dist.ReduceOp.MAX)

    if rank == 0:
        report = backend.reports[-1]
        print(
            f"fxsp demo: {world} ranks on {where}; {args.layers} layers, {args.rows} rows, "
            f"hidden {spec.hidden}"
        )
        if report.cached:
            print(
                "(Inductor reused the compiled graph from its cache; "
                "fxsp's report was read back with it)"
            )
        print(
            "rules applied:", ", ".join(f"{k}={v}" for k, v in report.counts.items() if v) or "none"
        )
        before = one_site(report.before, "all_reduce.default", 1)
        after = one_site(report.rewritten, "reduce_scatter", 1)
        if before and after:
            print("\none layer's all-reduce -> norm, as fxsp got it (post-grad ATen graph):")
            print("\n".join("    " + line for line in before))
            print(
                "the same site rewritten (fxsp IR ops, before lowering): reduce-scatter -> norm on "
                "this rank's rows -> all-gather:"
            )
            print("\n".join("    " + line for line in after))
        else:
            print(
                "no all-reduce -> norm site was rewritten, so there is no before and after to show"
            )
        print("\nper all-reduce site, per rank:")
        print(f"  without SP: {report.traffic_before.per_layer(world)}")
        print(f"  with SP:    {report.traffic_after.per_layer(world)}")
        left = report.traffic_after.bytes.get("all_reduce", 0)
        if left:
            print("some all-reduces stayed; the SP rules' best near-misses:")
            for rule, near in report.misses.items():
                if rule.startswith("sp.") and near.anchor != "-":
                    print("  ", near)
        else:
            print(f"every all-reduce site was rewritten ({report.traffic_after.sites} sites)")
        print(f"max |fxsp - eager| over all ranks: {error.item():.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
