"""Run time and memory of a TP Llama on CPU over gloo, TP 2: fxsp (SP) against plain Inductor.

    .venv/bin/python benchmarks/sp_runtime.py [--rows 64 512 4096]

A real 2-rank gloo world (tests/worlds.py spawns it; one thread per rank on this 2-core
machine). Per row count, each rank compiles fxsp.testing.tp_llama.TPLlama (2 layers, hidden
512, 8 heads, MLP 1024, fp32, one sequence of `rows` tokens) twice, with `fxsp.backend` and with
plain Inductor, checks both against the eager model, then alternates their steps:

- step time: median over the timed steps of the slowest rank, each step started by a barrier;
- peak memory per rank: the most tensor memory allocated during a step over what was allocated
  before it (weights, inputs), from the profiler's allocation events; median and range of 3
  steps, the largest rank's. It varies from step to step with SP on gloo: gloo's reduce-scatter
  clones its whole input on a worker thread, and how many clones are alive at once depends on
  thread timing;
- norm rows and residual bytes per rank, and collective bytes per layer (two all-reduce sites),
  from fxsp's report of the graph (`backend.reports[-1].traffic_before` / `traffic_after`);
- gloo itself: one all-reduce against one reduce-scatter plus one all-gather of a [rows, hidden]
  tensor, the collectives SP swaps, outside the model.

SP halves each rank's norm work and residual stream, and on NCCL sends as many bytes as the
all-reduce (ring algorithms: RS + AG = AR), in twice the calls. gloo is different: it has no
reduce-scatter of its own, torch's ProcessGroupGloo runs one as a full all-reduce plus a copy of
this rank's rows (the script checks this with the profiler and says so). On gloo, RS + AG is
therefore an all-reduce *plus* an all-gather: slower than the all-reduce it replaces at every
size, and the step-time table shows what that costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # `benchmarks.*`, `tests.*` from a script

import fxsp
from benchmarks.plotting import save_plot
from fxsp.testing.tp_llama import Spec, TPLlama
from tests.worlds import run_world

SPEC = Spec(layers=2, hidden=512, heads=8, inter=1024, vocab=512)
TP = 2
ROWS = (64, 512, 4096)
COLLECTIVE_REPEATS = 10
MiB = 1024 * 1024
c10d = torch.ops._c10d_functional


def steps_for(rows: int) -> int:
    """Timed steps per variant: fewer where one step takes seconds (keeps the script ~5 min)."""
    return 3 if rows >= 4096 else 8


def peak_step_memory(fn, tokens: torch.Tensor, steps: int = 3) -> list:
    """Bytes, per call: the peak of tensor memory allocated during the call over what existed
    before it, from the profiler's allocation events (every thread's, gloo's workers included)."""
    from torch.profiler import ProfilerActivity, profile

    peaks = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(tokens)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as trace:
                events = json.load(trace)["traceEvents"]
        # The profiler counts allocations from its start: "Total Allocated" is memory above then.
        totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
        peaks.append(max(totals, default=0))
    return peaks


def collective_ms(rows: int, hidden: int) -> dict:
    """Median ms of gloo's all-reduce, and of reduce-scatter + all-gather, of [rows, hidden]:
    the functional collectives the compiled graphs call."""
    full = torch.randn(rows, hidden)
    group = dist.group.WORLD.group_name

    def all_reduce() -> None:
        c10d.wait_tensor(c10d.all_reduce(full, "sum", group))

    def scatter_gather() -> None:
        shard = c10d.wait_tensor(c10d.reduce_scatter_tensor(full, "sum", TP, group))
        c10d.wait_tensor(c10d.all_gather_into_tensor(shard, TP, group))

    out = {}
    for name, fn in (("all_reduce", all_reduce), ("rs_ag", scatter_gather)):
        fn()
        times = []
        for _ in range(COLLECTIVE_REPEATS):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times) * 1e3
    return out


def gloo_reduce_scatter_runs_all_reduce() -> bool:
    """Whether this process group's reduce-scatter is an all-reduce underneath (gloo's is)."""
    from torch.profiler import ProfilerActivity, profile

    full = torch.randn(2 * TP, 4)
    group = dist.group.WORLD.group_name
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        c10d.wait_tensor(c10d.reduce_scatter_tensor(full, "sum", TP, group))
    return any(e.name == "gloo:all_reduce" for e in prof.events())


def measure(rank: int, world: int, rows_list: list) -> list:
    """Per row count, this rank's figures (see the module docstring)."""
    results = []
    for rows in rows_list:
        torch._dynamo.reset()
        model = TPLlama(SPEC)
        tokens = model.example_input(rows)
        backend = fxsp.backend(None, min_tokens=0)
        compiled = {
            "inductor": torch.compile(model, backend="inductor"),
            "fxsp": torch.compile(model, backend=backend),
        }
        figures: dict = {
            "rows": rows,
            "step_ms": {},
            "peak_bytes": {},
            "compile_s": {},
            "error": {},
        }
        with torch.no_grad():
            reference = model(tokens)
            for name, fn in compiled.items():
                start = time.perf_counter()
                out = fn(tokens)
                figures["compile_s"][name] = time.perf_counter() - start
                figures["error"][name] = (out - reference).abs().max().item()
                fn(tokens)  # one warm step
            assert backend.reports, "the fxsp-compiled model did not go through fxsp"
            times: dict = {name: [] for name in compiled}
            for step in range(steps_for(rows)):
                # Alternate which variant goes first, so neither always follows the other.
                for name in list(compiled) if step % 2 == 0 else list(reversed(compiled)):
                    dist.barrier()
                    start = time.perf_counter()
                    compiled[name](tokens)
                    times[name].append(time.perf_counter() - start)
            for name, fn in compiled.items():
                figures["step_ms"][name] = statistics.median(times[name]) * 1e3
                dist.barrier()
                figures["peak_bytes"][name] = peak_step_memory(fn, tokens)
        report = backend.reports[-1]
        figures["counts"] = {k: v for k, v in report.counts.items() if k.startswith("sp.") and v}
        for when, traffic in (("before", report.traffic_before), ("after", report.traffic_after)):
            sites = max(traffic.sites, 1)
            figures[when] = {
                "norm_rows": max(traffic.norm_rows),
                "residual_rows": max(traffic.residual_rows),
                # two all-reduce sites per layer (attention out, MLP out)
                "payload_per_layer": {k: 2 * v / sites for k, v in traffic.bytes.items()},
                "sent_per_layer": 2 * traffic.sent_per_rank(TP) / sites,
            }
        figures["gloo_ms"] = collective_ms(rows, SPEC.hidden)
        figures["rs_is_all_reduce"] = gloo_reduce_scatter_runs_all_reduce()
        results.append(figures)
    return results


def combine(by_rank: list) -> list:
    """Rank 0's figures, with step time the slowest rank's and memory (per-step peaks) the rank's
    with the largest median."""
    combined = []
    for per_rank in zip(*by_rank):
        figures = dict(per_rank[0])
        for key in ("step_ms", "gloo_ms", "error", "compile_s"):
            figures[key] = {name: max(r[key][name] for r in per_rank) for name in per_rank[0][key]}
        figures["peak_bytes"] = {
            name: max((r["peak_bytes"][name] for r in per_rank), key=statistics.median)
            for name in per_rank[0]["peak_bytes"]
        }
        combined.append(figures)
    return combined


def mib(peaks: list) -> str:
    """Median [min-max] of per-step peaks, in MiB."""
    return f"{statistics.median(peaks) / MiB:.1f} [{min(peaks) / MiB:.1f}-{max(peaks) / MiB:.1f}]"


def print_tables(results: list) -> None:
    bytes_per_row = SPEC.hidden * SPEC.dtype.itemsize
    print(
        f"TP {TP} over gloo, CPU, 1 thread per rank; {SPEC.layers} layers, hidden {SPEC.hidden}, "
        f"MLP {SPEC.inter}, {SPEC.dtype}\n"
    )
    print(
        f"{'rows':>5} {'steps':>5} {'inductor ms':>11} {'fxsp ms':>8} {'fxsp/ind':>8} "
        f"{'peak MiB ind':>18} {'peak MiB fxsp':>18} {'compile s ind/fxsp':>18} "
        f"{'max err ind/fxsp':>17}"
    )
    for f in results:
        s, p, c, e = f["step_ms"], f["peak_bytes"], f["compile_s"], f["error"]
        print(
            f"{f['rows']:>5} {steps_for(f['rows']):>5} {s['inductor']:>11.1f} {s['fxsp']:>8.1f} "
            f"{s['fxsp'] / s['inductor']:>8.2f} {mib(p['inductor']):>18} {mib(p['fxsp']):>18} "
            f"{c['inductor']:>9.1f}/{c['fxsp']:<8.1f} {e['inductor']:>8.1e}/{e['fxsp']:.1e}"
        )
    print(
        "\nper rank, per layer (fxsp's report; 'ind' = the graph before SP, as Inductor runs it;"
        "\n'sent' = bytes a rank sends with ring algorithms, as NCCL runs them, not gloo):"
    )
    print(
        f"{'rows':>5} {'norm rows ind/fxsp':>18} {'residual KiB ind/fxsp':>21} "
        f"{'payload KiB ind':>15} {'payload KiB fxsp (RS + AG)':>26} {'sent KiB ind/fxsp':>17}"
    )
    for f in results:
        b, a = f["before"], f["after"]
        payload_after = " + ".join(
            f"{a['payload_per_layer'].get(k, 0) / 1024:.0f}"
            for k in ("reduce_scatter", "all_gather")
        )
        print(
            f"{f['rows']:>5} {b['norm_rows']:>9}/{a['norm_rows']:<8} "
            f"{b['residual_rows'] * bytes_per_row / 1024:>10.0f}/"
            f"{a['residual_rows'] * bytes_per_row / 1024:<10.0f} "
            f"{b['payload_per_layer'].get('all_reduce', 0) / 1024:>15.0f} {payload_after:>26} "
            f"{b['sent_per_layer'] / 1024:>8.0f}/{a['sent_per_layer'] / 1024:<8.0f}"
        )
    print(
        f"\ngloo alone, one [rows, {SPEC.hidden}] fp32 tensor "
        f"(median of {COLLECTIVE_REPEATS}, slowest rank):"
    )
    print(f"{'rows':>5} {'all-reduce ms':>13} {'RS + AG ms':>10} {'ratio':>6}")
    for f in results:
        g = f["gloo_ms"]
        print(
            f"{f['rows']:>5} {g['all_reduce']:>13.3f} {g['rs_ag']:>10.3f} "
            f"{g['rs_ag'] / g['all_reduce']:>6.2f}"
        )
    if all(f["rs_is_all_reduce"] for f in results):
        print(
            "gloo's reduce-scatter runs a full all-reduce underneath (profiler: gloo:all_reduce), "
            "so on gloo RS + AG = AR + AG."
        )


def plot(results: list) -> None:
    rows = [f["rows"] for f in results]

    def draw(axes) -> None:
        time_ax, memory_ax, gloo_ax = axes
        for name, marker in (("inductor", "s-"), ("fxsp", "o-")):
            label = "plain Inductor" if name == "inductor" else "fxsp (SP)"
            time_ax.plot(rows, [f["step_ms"][name] for f in results], marker, label=label)
            medians = [statistics.median(f["peak_bytes"][name]) / MiB for f in results]
            spread = [
                [m - min(f["peak_bytes"][name]) / MiB for m, f in zip(medians, results)],
                [max(f["peak_bytes"][name]) / MiB - m for m, f in zip(medians, results)],
            ]
            memory_ax.errorbar(rows, medians, yerr=spread, fmt=marker, capsize=3, label=label)
        time_ax.set(
            xscale="log",
            yscale="log",
            xlabel="rows",
            ylabel="step ms (slowest rank)",
            title="step time, TP 2 gloo",
        )
        memory_ax.set(
            xscale="log",
            yscale="log",
            xlabel="rows",
            ylabel="MiB (median, range of 3 steps)",
            title="peak step memory per rank",
        )
        gloo_ax.plot(rows, [f["gloo_ms"]["all_reduce"] for f in results], "s-", label="all-reduce")
        gloo_ax.plot(
            rows,
            [f["gloo_ms"]["rs_ag"] for f in results],
            "o-",
            label="reduce-scatter + all-gather",
        )
        gloo_ax.set(
            xscale="log",
            yscale="log",
            xlabel="rows",
            ylabel="ms",
            title=f"gloo collectives, [rows, {SPEC.hidden}] fp32",
        )
        for ax in axes:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()

    save_plot("sp_runtime", draw, panels=3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:  # fresh Inductor cache, shared by both ranks
        results = combine(run_world(TP, measure, args.rows, cache_dir=cache, timeout=900))
    print_tables(results)
    plot(results)
    by_rows = {f["rows"]: f for f in results}
    ratios = ", ".join(
        f"{r} rows {f['step_ms']['fxsp'] / f['step_ms']['inductor']:.2f}x"
        for r, f in by_rows.items()
    )
    gloo = ", ".join(
        f"{r} rows {f['gloo_ms']['rs_ag'] / f['gloo_ms']['all_reduce']:.2f}x"
        for r, f in by_rows.items()
    )
    underneath = (
        " (gloo's RS is an AR underneath)" if all(f["rs_is_all_reduce"] for f in results) else ""
    )
    print(
        f"\nsummary: fxsp step time / Inductor's: {ratios}; "
        f"norm rows and residual per rank 1/{TP}; "
        f"gloo RS+AG / AR: {gloo}{underneath} ({time.perf_counter() - start:.0f} s in all)"
    )


if __name__ == "__main__":
    main()
