"""Bandwidth and launch cost of fxsp's Triton norm kernels, against Inductor's and a copy.

    python benchmarks/norm_bandwidth.py                       # the full table
    python benchmarks/norm_bandwidth.py --hidden 8192 --rows 4096 --ops fused_add_rms_norm

For each op (RMSNorm, fused add+RMSNorm, and each followed by static FP8 quant), hidden size
(4096, 5120, 8192) and row count (decode: 8 to 256; prefill: 4k to 16k), bf16, it times:

- `fxsp eager`: the op called eagerly, `torch.ops.fxsp_triton.<op>` (its body launches the
  Triton kernel directly);
- `fxsp compiled`: the same op inside `torch.compile`: Inductor traces the op's body and calls
  the kernel from its generated code;
- `inductor`: `torch.compile` of the op's reference in `fxsp/ir/ops.py`: Inductor's own kernel;
- `copy`: `copy_` of as many bytes as the op must move: the bandwidth a memory-bound kernel can
  hope for at that size.

Columns, per call:

- `GPU us`: device time, from replaying a CUDA graph of 20 calls (no launch cost, no gaps);
- `b2b us`: calls issued back to back without graphs or synchronisation: what a model run
  without CUDA graphs pays, the larger of host and device time;
- `host us`: time the host spends issuing one call (timed on the host over 200 calls with no
  synchronisation between them): the launch path's own cost;
- `GB/s`: the bytes the op must move (read x (and residual), write out (and residual_out); the
  weight is one row, read from cache) over `GPU us`; `% copy`: copy's time over the kernel's,
  for the same bytes. At decode sizes everything sits in L2: read the microseconds there.

Compiled functions are compiled once per op and hidden size, the rows dimension dynamic. Each
kernel's result is checked against the reference before it is timed. The goals (issue 14):
every fxsp kernel at >= 85 % of copy in GPU time and no slower than Inductor's kernel; host time
per call no more than the Inductor-compiled reference's; back-to-back within 10 % of the GPU
time at 4096 x 8192.

Without CUDA, fxsp's kernels cannot run (only in Triton's interpreter, which times nothing
useful): the script then times Inductor's CPU kernels and a copy at a few sizes, with wall
clock, so that it still runs end to end, and says which columns need a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `fxsp` from a script

from fxsp.ir.ops import (
    fused_add_rms_norm_reference,
    rms_norm_reference,
    static_fp8_quant_reference,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HIDDEN = (4096, 5120, 8192)
DECODE_ROWS = (8, 32, 128, 256)
PREFILL_ROWS = (4096, 8192, 16384)
CPU_ROWS = (8, 256, 4096)
FP8 = torch.float8_e4m3fn
EPS = 1e-6
GRAPH_CALLS = 20  # calls captured in one CUDA graph
HOST_CALLS = 200  # calls timed on the host; few enough not to fill the launch queue


@dataclass(frozen=True)
class Op:
    name: str
    residual: bool
    fp8: bool

    def reference(self, x, residual, weight, scale):
        if self.residual:
            out, residual_out = fused_add_rms_norm_reference(x, residual, weight, EPS)
        else:
            out, residual_out = rms_norm_reference(x, weight, EPS), None
        if self.fp8:
            out = static_fp8_quant_reference(out, scale, FP8)
        return out if residual_out is None else (out, residual_out)

    def fxsp(self, x, residual, weight, scale):
        ops = torch.ops.fxsp_triton
        if self.residual:
            if self.fp8:
                return ops.fused_add_rms_norm_static_fp8_quant(x, residual, weight, EPS, scale, FP8)
            return ops.fused_add_rms_norm(x, residual, weight, EPS)
        if self.fp8:
            return ops.rms_norm_static_fp8_quant(x, weight, EPS, scale, FP8)
        return ops.rms_norm(x, weight, EPS)

    def bytes_moved(self, rows: int, hidden: int, element: int) -> int:
        """Read x (and residual), write out (one byte a value when FP8) and residual_out."""
        values = rows * hidden
        moved = values * element + values * (1 if self.fp8 else element)
        return moved + (2 * values * element if self.residual else 0)


OPS = (
    Op("rms_norm", False, False),
    Op("fused_add_rms_norm", True, False),
    Op("rms_norm+fp8", False, True),
    Op("fused_add_rms_norm+fp8", True, True),
)


# --- Timing ------------------------------------------------------------------------------------


def graph_us(fn: Callable[[], object], replays: int = 10) -> float:
    """Device time of one call: median over replays of a CUDA graph of GRAPH_CALLS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as graph capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / GRAPH_CALLS)
    del graph
    return statistics.median(times)


def host_us(fn: Callable[[], object]) -> float:
    """Host time to issue one call: HOST_CALLS calls, no synchronisation between them."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e6 / HOST_CALLS


def back_to_back_us(fn: Callable[[], object]) -> float:
    """Wall time per call of HOST_CALLS calls in a row, synchronised at both ends only."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(HOST_CALLS):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / HOST_CALLS


def wall_us(fn: Callable[[], object], repeats: int = 20) -> float:
    """CPU: median wall time of one call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


# --- The table ---------------------------------------------------------------------------------


def inputs(rows: int, hidden: int, dtype: torch.dtype, device: torch.device):
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    return (
        x,
        torch.randn_like(x),
        torch.randn(hidden, dtype=dtype, device=device),
        torch.tensor(0.05, device=device),
    )


def compiled(fn: Callable) -> Callable:
    """torch.compile of fn(x, residual, weight, scale), rows dynamic: one compile for all sizes."""
    inner = torch.compile(fn, fullgraph=True)

    def call(x, residual, weight, scale):
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(residual, 0)
        return inner(x, residual, weight, scale)

    return call


def check(op: Op, actual, expected) -> float:
    """Max |difference| of the normed output; the residual output must be equal."""
    if op.residual:
        (actual, actual_residual), (expected, expected_residual) = actual, expected
        assert torch.equal(actual_residual, expected_residual), f"{op.name}: residual_out differs"
    return (actual.float() - expected.float()).abs().max().item()


def measure_cuda(ops: list, hidden_sizes: list, rows_list: list, dtype: torch.dtype) -> list:
    from fxsp.ir.kernels import triton as triton_kernels

    assert not triton_kernels.runs_interpreted(), "unset TRITON_INTERPRET to time kernels"
    device = torch.device("cuda")
    results = []
    for op in ops:
        for hidden in hidden_sizes:
            for group in size_groups(rows_list):
                results += measure_group(op, hidden, group, dtype, device)
    return results


def size_groups(rows_list: list) -> list:
    """Decode and prefill row counts apart, each largest first: a compile with dynamic rows
    tunes its kernels for the size it first sees, so each group gets its own."""
    groups = [
        sorted((r for r in rows_list if r < 1024), reverse=True),
        sorted((r for r in rows_list if r >= 1024), reverse=True),
    ]
    return [g for g in groups if g]


def measure_group(
    op: Op, hidden: int, rows_list: list, dtype: torch.dtype, device: torch.device
) -> list:
    results = []
    torch._dynamo.reset()  # a compile of its own: Dynamo would reuse one of another group
    contenders = {
        "fxsp eager": op.fxsp,
        "fxsp compiled": compiled(op.fxsp),
        "inductor": compiled(op.reference),
    }
    for rows in rows_list:
        x, residual, weight, scale = inputs(rows, hidden, dtype, device)
        args = (x, residual, weight, scale)
        expected = op.reference(*args)
        moved = op.bytes_moved(rows, hidden, x.element_size())
        source = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        row = {
            "op": op.name,
            "hidden": hidden,
            "rows": rows,
            "bytes": moved,
            "max_error": {},
            "gpu_us": {},
            "b2b_us": {},
            "host_us": {},
        }
        for name, fn in contenders.items():
            row["max_error"][name] = check(op, fn(*args), expected)
        calls = {name: (lambda fn=fn: fn(*args)) for name, fn in contenders.items()}
        calls["copy"] = lambda: target.copy_(source)
        for name, call in calls.items():
            row["gpu_us"][name] = graph_us(call)
            row["b2b_us"][name] = back_to_back_us(call)
            row["host_us"][name] = host_us(call)
        results.append(row)
        print_row(row)
    return results


def measure_cpu(ops: list, hidden_sizes: list, rows_list: list, dtype: torch.dtype) -> list:
    device = torch.device("cpu")
    results = []
    for op in ops:
        for hidden in hidden_sizes:
            torch._dynamo.reset()
            inductor = compiled(op.reference)
            for rows in sorted(rows_list, reverse=True):
                x, residual, weight, scale = inputs(rows, hidden, dtype, device)
                args = (x, residual, weight, scale)
                moved = op.bytes_moved(rows, hidden, x.element_size())
                source = torch.empty(moved // 2, dtype=torch.uint8)
                target = torch.empty_like(source)
                row = {
                    "op": op.name,
                    "hidden": hidden,
                    "rows": rows,
                    "bytes": moved,
                    "max_error": {"inductor": check(op, inductor(*args), op.reference(*args))},
                    "gpu_us": {
                        "inductor": wall_us(lambda: inductor(*args)),
                        "copy": wall_us(lambda: target.copy_(source)),
                    },
                    "b2b_us": {},
                    "host_us": {},
                }
                results.append(row)
                print_row(row)
    return results


HEADER = (
    f"{'op':<24}{'hidden':>7}{'rows':>7}  {'kernel':<14}{'GPU us':>9}{'b2b us':>9}"
    f"{'host us':>9}{'GB/s':>8}{'% copy':>8}{'max err':>9}"
)


def print_row(row: dict) -> None:
    copy_us = row["gpu_us"]["copy"]
    for name, us in row["gpu_us"].items():
        b2b, host = row["b2b_us"].get(name), row["host_us"].get(name)
        error = row["max_error"].get(name)
        print(
            f"{row['op']:<24}{row['hidden']:>7}{row['rows']:>7}  {name:<14}{us:>9.1f}"
            f"{_or_dash(b2b, '9.1f')}{_or_dash(host, '9.1f')}{row['bytes'] / us / 1e3:>8.0f}"
            f"{100 * copy_us / us:>7.0f}%{_or_dash(error, '9.2g')}",
            flush=True,
        )


def _or_dash(value, spec: str) -> str:
    width = spec.split(".")[0]
    return f"{'-':>{width}}" if value is None else format(value, f">{spec}")


def summary(results: list) -> list:
    """One line per op and hidden size at the largest row count: the goals' figures."""
    lines = []
    largest = {}
    for r in results:
        key = (r["op"], r["hidden"])
        if key not in largest or r["rows"] > largest[key]["rows"]:
            largest[key] = r
    for (op, hidden), r in largest.items():
        gpu, host = r["gpu_us"], r["host_us"]
        if "fxsp eager" not in gpu:
            continue
        share = 100 * gpu["copy"] / gpu["fxsp eager"]
        lines.append(
            f"{op} {r['rows']} x {hidden}: fxsp {share:.0f} % of copy (goal >= 85), "
            f"{gpu['fxsp eager']:.1f} us against Inductor's {gpu['inductor']:.1f} us; host "
            f"{host['fxsp eager']:.1f} us eager, {host['fxsp compiled']:.1f} us compiled, against "
            f"Inductor's {host['inductor']:.1f} us; back-to-back / GPU "
            f"{r['b2b_us']['fxsp eager'] / gpu['fxsp eager']:.2f} (goal <= 1.10)"
        )
    return lines


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=[op.name for op in OPS])
    parser.add_argument("--hidden", type=int, nargs="+")
    parser.add_argument("--rows", type=int, nargs="+")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)

    ops = [op for op in OPS if not args.ops or op.name in args.ops]
    dtype = DTYPES[args.dtype]
    cuda = torch.cuda.is_available()
    if cuda:
        try:
            from fxsp.ir.kernels import triton as triton_kernels
        except ImportError as error:
            print(f"norm_bandwidth: cannot load fxsp's Triton kernels ({error})")
            return 1
        if triton_kernels.triton is None:
            print("norm_bandwidth: Triton is not installed; it is needed to time fxsp's kernels")
            return 1
        device = torch.cuda.get_device_name()
        hidden = args.hidden or list(HIDDEN)
        rows = args.rows or [*DECODE_ROWS, *PREFILL_ROWS]
    else:
        torch.set_num_threads(1)  # steadier on a shared machine; these are smoke figures
        device = "CPU (1 thread)"
        hidden = args.hidden or [HIDDEN[0]]
        rows = args.rows or list(CPU_ROWS)
        print(
            "norm_bandwidth: no CUDA device. fxsp's Triton kernels, CUDA-graph GPU time, host "
            "and back-to-back time need CUDA; timing Inductor's CPU kernels and a copy "
            "(wall clock, 'GPU us' column) so that the script runs end to end."
        )
    print(f"device: {device}; dtype {args.dtype}; {torch.__version__}")
    print(HEADER)
    measure = measure_cuda if cuda else measure_cpu
    results = measure(ops, hidden, rows, dtype)
    for line in summary(results):
        print("summary:", line)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": device,
                    "dtype": args.dtype,
                    "torch": torch.__version__,
                    "results": results,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
