"""What sequence parallelism saves one rank: step time and peak memory, SP against no SP.

    python benchmarks/sp_per_rank.py                 # CPU: small sizes; CUDA: the full grid
    python benchmarks/sp_per_rank.py --full          # the full grid anywhere
    python benchmarks/sp_per_rank.py --hidden 4096 --tokens 1024 4096 --tp 2 8

One process, on the fake process group: a "world" of `tp` ranks whose collectives do nothing
(an all-reduce leaves its input as it is, a reduce-scatter or all-gather returns an unfilled
buffer). So what is timed is what one rank computes and stores, with no communication: the
per-rank saving SP promises, on one device, where NCCL cannot run two ranks.

For each hidden size and TP size, fxsp.testing.tp_llama.TPLlama (2 layers, Llama-style MLP of
3.5 x hidden, head dim 128 where the TP size allows, the device's dtype: bf16 on CUDA, fp32 on
CPU) is compiled twice with `fxsp.backend`: with SP (`min_tokens=0`) and without
(`batch_invariant=True`, which turns SP off and changes nothing else: the same raising, the
same provider kernels). Both are compiled once for any token count (the token dimension is
marked dynamic), then run alternately at each token count t (a multiple of the TP size), t + 1
(rows TP does not divide: SP pads them) and t + tp:

- step ms: median over the timed steps (CUDA events on CUDA, the wall clock on CPU);
- peak MiB: tensor memory allocated during a step over what existed before it (CUDA's
  allocator statistics; on CPU the profiler's allocation events);
- norm and residual rows per rank, from fxsp's report of the compiled graph: each norm's rows,
  and the rows of the residual stream each fused add+norm keeps. The goal: 1/tp of the rows
  without SP (rounded up, for rows TP does not divide);
- padding: what the SP step at rows TP does not divide (t + 1: padded to t + tp in the SP
  region, trimmed where values leave it) costs over the SP step at t + tp rows, which computes
  the same padded rows with no padding at all (and tp - 1 more rows outside the SP region, so
  this slightly understates the cost, by at most (tp - 1) / t of the step). Goal: under 2 %.
  (Kernel names do not serve here: Inductor names a kernel fused from nodes fxsp built by
  number, not by op.)

The table goes to stdout; `--json PATH` also writes every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `fxsp`, `benchmarks.*` from a script

import fxsp
from fxsp.testing.tp_llama import Spec, TPLlama

MiB = 2**20
FULL = {"hidden": (4096, 8192), "tokens": (1024, 4096, 16384), "tp": (2, 4, 8)}
SMALL = {"hidden": (256, 512), "tokens": (256, 1024), "tp": (2, 4, 8)}


def spec_for(hidden: int, tp: int, dtype: torch.dtype, layers: int) -> Spec:
    """A Llama-shaped model: heads of 128 (fewer, larger heads where TP would split one)."""
    heads = max(hidden // 128, tp)
    inter = math.ceil(hidden * 3.5 / (64 * tp)) * 64 * tp  # divisible by tp, aligned shards
    return Spec(
        layers=layers, hidden=hidden, heads=heads, inter=inter, vocab=1024 * tp, dtype=dtype
    )


class Clock:
    """Times one call: CUDA events on CUDA, the wall clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def ms(self, fn, *args) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn(*args)
        return (time.perf_counter() - begin) * 1e3


def peak_bytes(fn, tokens: torch.Tensor) -> int:
    """Tensor memory allocated during one call over what existed before it."""
    if tokens.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(tokens)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from benchmarks.sp_runtime import peak_step_memory  # the profiler's allocation events

    return min(peak_step_memory(fn, tokens, steps=1))


def rows_per_rank(backend: fxsp.backend, when: str) -> tuple:
    """(norm rows, residual rows) per norm, the largest, from the last compiled graph's report;
    for dynamic token counts, at the size the graph was compiled with (Dynamo's hint)."""
    traffic = getattr(backend.reports[-1], f"traffic_{when}")
    return max(traffic.norm_rows, default=0), max(traffic.residual_rows, default=0)


def measure(
    hidden: int,
    tp: int,
    tokens: tuple,
    device: torch.device,
    dtype: torch.dtype,
    layers: int,
    steps: int,
) -> list:
    """Figures for one model (hidden, tp), every token count; see the module docstring."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        torch._dynamo.reset()
        model = TPLlama(spec_for(hidden, tp, dtype, layers)).to(device)
        backends = {
            "no SP": fxsp.backend(None, batch_invariant=True, allreduce_fusion=False),
            "SP": fxsp.backend(None, min_tokens=0, allreduce_fusion=False),
        }
        compiled = {
            name: torch.compile(model, backend=backend) for name, backend in backends.items()
        }
        clock = Clock(device)
        token_counts = sorted({n for t in tokens for n in (t, t + 1, t + tp)})
        results = []
        with torch.no_grad():
            for tokens_count in token_counts:
                tokens = model.example_input(tokens_count).to(device)
                torch._dynamo.mark_dynamic(tokens, 0)
                row = {
                    "hidden": hidden,
                    "tp": tp,
                    "tokens": tokens_count,
                    "step_ms": {},
                    "peak_mib": {},
                    "compile_s": {},
                }
                for name, fn in compiled.items():
                    start = time.perf_counter()
                    fn(tokens)  # compiles on the first token count
                    row["compile_s"][name] = round(time.perf_counter() - start, 2)
                    fn(tokens)
                    fn(tokens)
                times = {name: [] for name in compiled}
                for _ in range(steps):
                    for name, fn in compiled.items():
                        times[name].append(clock.ms(fn, tokens))
                for name, fn in compiled.items():
                    row["step_ms"][name] = statistics.median(times[name])
                    row["peak_mib"][name] = peak_bytes(fn, tokens) / MiB
                sp = backends["SP"]
                assert any(k.startswith("sp.") and v for k, v in sp.reports[-1].counts.items()), (
                    f"SP rewrote nothing: {sp.reports[-1].counts}"
                )
                row["rows_no_sp"] = rows_per_rank(sp, "before")
                row["rows_sp"] = rows_per_rank(sp, "after")
                results.append(row)
        by_tokens = {r["tokens"]: r for r in results}
        for r in results:
            if r["tokens"] % tp:  # t + 1 against t + tp
                unpadded = by_tokens[r["tokens"] - 1 + tp]["step_ms"]["SP"]
                r["padding_cost"] = r["step_ms"]["SP"] / unpadded - 1
        return results
    finally:
        dist.destroy_process_group()


def print_header(device_name: str) -> None:
    print(
        f"\nper-rank step time and peak memory, SP against no SP ({device_name}; fake "
        "process group: no communication)"
    )
    print(
        "(norm rows: per norm, of the graph as compiled, at the token count Dynamo first saw; "
        "pad %: SP step at t + 1 rows over the SP step at t + tp, minus 1)"
    )
    print(
        f"{'hidden':>6} {'tp':>3} {'tokens':>6} | {'no SP ms':>9} {'SP ms':>9} {'SP/no':>6} | "
        f"{'no SP MiB':>9} {'SP MiB':>9} {'SP/no':>6} | {'norm rows':>13} {'1/tp':>6} | "
        f"{'pad %':>6}",
        flush=True,
    )


def print_rows(results: list) -> None:
    for r in results:
        before, after = r["step_ms"]["no SP"], r["step_ms"]["SP"]
        mem_before, mem_after = r["peak_mib"]["no SP"], r["peak_mib"]["SP"]
        norm_before, norm_after = r["rows_no_sp"][0], r["rows_sp"][0]
        goal = math.ceil(norm_before / r["tp"])
        padding = f"{100 * r['padding_cost']:>6.1f}" if "padding_cost" in r else f"{'':>6}"
        print(
            f"{r['hidden']:>6} {r['tp']:>3} {r['tokens']:>6} | {before:>9.2f} {after:>9.2f} "
            f"{after / before:>6.2f} | {mem_before:>9.1f} {mem_after:>9.1f} "
            f"{mem_after / max(mem_before, 1e-9):>6.2f} | {norm_before:>6} -> {norm_after:<5}"
            f"{'ok' if norm_after == goal else 'NO':>6} | {padding}",
            flush=True,
        )


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full grid, also on CPU")
    parser.add_argument("--hidden", type=int, nargs="+")
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        help="multiples of every TP size; each is also run with one more row",
    )
    parser.add_argument("--tp", type=int, nargs="+")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=0, help="timed steps (default: 10 CUDA, 5 CPU)"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"))
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (one is steadiest on a shared machine)"
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = dict(FULL if args.full or device.type == "cuda" else SMALL)
    for key in grid:
        grid[key] = tuple(getattr(args, key) or grid[key])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = args.steps or (10 if device.type == "cuda" else 5)
    if device.type == "cuda":
        from fxsp.ir.kernels import load_gpu_providers

        load_gpu_providers()
        device_name = torch.cuda.get_device_name(device)
    else:
        torch.set_flush_denormal(True)  # unfilled collective buffers must not slow the CPU down
        torch.set_num_threads(args.threads)
        device_name = f"CPU, {torch.get_num_threads()} thread(s)"

    # fxsp's reports (norm rows) come from its pass, which a warm compile cache skips.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    results = []
    print_header(device_name)
    for hidden in grid["hidden"]:
        for tp in grid["tp"]:
            start = time.perf_counter()
            model_results = measure(hidden, tp, grid["tokens"], device, dtype, args.layers, steps)
            print_rows(model_results)
            print(f"  (hidden {hidden}, tp {tp}: {time.perf_counter() - start:.0f} s)", flush=True)
            results += model_results
            if args.json:  # after every model: a run cut short keeps what it measured
                args.json.write_text(
                    json.dumps(
                        {
                            "device": device_name,
                            "dtype": str(dtype),
                            "layers": args.layers,
                            "results": results,
                        },
                        indent=1,
                    )
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
