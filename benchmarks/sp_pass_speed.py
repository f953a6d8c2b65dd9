"""SP pass speed: fxsp against the same rewrite on Inductor's pattern matcher (vLLM-style).

    .venv/bin/python benchmarks/sp_pass_speed.py [--profile] [--layers 4 16 32 80]

1. What the user pays: fxsp's passes, all of them (`fxsp.compile.passes.run_passes`: raise, SP
   rules,
   clean-up, lowering) on raw post-grad graphs, the ones Inductor hands its post-grad passes
   (benchmarks/post_grad_llama.py: fxsp.testing.tp_llama's TPLlama, bf16, functional
   all-reduce), once with the HF norm spelling and once with `F.rms_norm`. The baseline is
   `RawPatternMatcherSP` (benchmarks/baseline_pattern_matcher.py): SP as vLLM writes it,
   `register_replacement(..., fwd_only, ...)` for first / middle / last norm per epsilon and
   dtype, 12 registrations per spelling, matching the decomposed norm and the functional
   all-reduce, plus its residual-slice clean-up. Goal (issue 13): >= 20x at 80 layers, fxsp's
   time linear in layers. The report's golden texts are printed when first read: "+texts" times
   the passes with the three texts read, as a compile with Inductor's cache on pays (it saves
   each report beside the cache).
2. Registration, in a fresh process each time (median of 5 processes per engine): the rule
   module's body (bytecode compiled beforehand, as Python's cache has it; dependencies imported)
   plus building the rule set. fxsp: fxsp/sp/rules.py and `sp_rules(config)`. Baseline: its
   module and `PatternMatcherSP(...)`, which traces and registers 24 patterns; one throw-away
   trace runs first, so Inductor's lazy imports are not counted against it.
3. The SP rules alone, on graphs already raised to fxsp's IR (benchmarks/ir_llama.py), against
   `PatternMatcherSP` on the same IR graphs: the matching engines alone, without raising or
   lowering (issue 7's figure).

Times are CPU seconds of this process (`time.process_time`; the machine is shared, and CPU time
moves less with load than wall time), median of 5 runs, each on a fresh deep copy of the graph
(the copy, and a garbage collection after it, are not timed); the engines take turns run by
run, so drifting load hits both. "Same
result": equal match counts and the same collectives left (reduce-scatters, all-gathers, no
all-reduce). A fake process group of 2 ranks; small tensors, since the graph is measured, not
the math. `--profile` prints where the passes' time goes at the largest layer count.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import importlib.util
import json
import pstats
import statistics
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.fx import GraphModule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks.*` from a script

from benchmarks.ir_llama import GROUP, trace_ir_llama
from benchmarks.plotting import save_plot
from benchmarks.post_grad_llama import post_grad_graph
from fxsp.cleanup import remove_dead_code
from fxsp.compile.passes import run_passes
from fxsp.sp.rules import SPConfig, sp_rules

LAYER_COUNTS = (4, 16, 32, 80, 128)
RAW_LAYER_COUNTS = (4, 16, 32, 80)
SPELLINGS = ("hf", "torch")
RUNS = 5
REGISTRATION_PROCESSES = 5
WORLD, RANK = 2, 0
CONFIG = SPConfig(group=GROUP, world=WORLD, rank=RANK, min_tokens=0)

c10d = torch.ops._c10d_functional
COLLECTIVES = {
    "reduce_scatter": c10d.reduce_scatter_tensor.default,
    "all_gather": c10d.all_gather_into_tensor.default,
    "all_reduce": torch.ops.fxsp.all_reduce.default,
    "c10d_all_reduce": c10d.all_reduce.default,
}


# ---------------------------------------------------------------------------------------------
# Registration, in a fresh process
# ---------------------------------------------------------------------------------------------


def run_rule_module(name: str, path: Path) -> tuple[types.ModuleType, float]:
    """Execute a rule module's code, compiled beforehand as Python's bytecode cache would have
    it; returns the module and the seconds its body took (patterns built at module level count)."""
    code = compile(path.read_text(), str(path), "exec")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
    sys.modules[name] = module  # dataclasses look their module up while the body runs
    start = time.perf_counter()
    exec(code, module.__dict__)  # noqa: S102 - fxsp's own module (or the baseline's), timed
    return module, time.perf_counter() - start


def register_fxsp() -> dict:
    """fxsp/sp/rules.py's body (its patterns are module-level data) plus `sp_rules`."""
    module, body = run_rule_module("fxsp.sp.rules", ROOT / "fxsp" / "sp" / "rules.py")
    start = time.perf_counter()
    rules = module.sp_rules(module.SPConfig(group=GROUP, world=WORLD, rank=RANK, min_tokens=0))
    build = time.perf_counter() - start
    return {"seconds": body + build, "build_seconds": build, "rules": len(rules.rules)}


def register_baseline() -> dict:
    """The baseline module's body plus tracing and registering its patterns."""
    import torch._inductor.pattern_matcher as pm
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # Inductor's lazy imports (decompositions, passes): not counted
        pm.fwd_only(lambda x: x + 1, [torch.empty(2)])
    module, body = run_rule_module(
        "benchmarks.baseline_pattern_matcher", ROOT / "benchmarks" / "baseline_pattern_matcher.py"
    )
    start = time.perf_counter()
    sp = module.PatternMatcherSP(GROUP, WORLD, RANK)
    build = time.perf_counter() - start
    return {
        "seconds": body + build,
        "build_seconds": build,
        "rules": sp.registrations,
        "distinct": sp.distinct,
    }


def registration_in_fresh_process(engine: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--registration", engine],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def registration(engine: str) -> dict:
    runs = [registration_in_fresh_process(engine) for _ in range(REGISTRATION_PROCESSES)]
    return {
        **runs[0],
        "seconds": statistics.median(r["seconds"] for r in runs),
        "build_seconds": statistics.median(r["build_seconds"] for r in runs),
    }


# ---------------------------------------------------------------------------------------------
# Apply, in this process
# ---------------------------------------------------------------------------------------------


def apply_fxsp(gm: GraphModule) -> int:
    report = sp_rules(CONFIG).apply(gm.graph)
    remove_dead_code(gm.graph)
    return sum(report.counts.values())


def run_fxsp_passes(gm: GraphModule) -> int:
    """All of fxsp's passes, as its backend runs them; returns the SP matches."""
    report = run_passes(gm.graph, CONFIG)
    return sum(report.counts.get(f"sp.{r}", 0) for r in ("first", "middle", "last"))


def run_fxsp_passes_and_texts(gm: GraphModule) -> int:
    """`run_fxsp_passes`, then the report's three golden texts read (printed when first read):
    what a compile with Inductor's cache on pays, which saves each report beside the cache."""
    report = run_passes(gm.graph, CONFIG)
    assert report.before and report.rewritten and report.after
    return sum(report.counts.get(f"sp.{r}", 0) for r in ("first", "middle", "last"))


def timed_apply(original: GraphModule, engines: dict) -> dict:
    """Per engine: (matches, median CPU seconds, collectives left) of applying it to fresh
    copies of `original`. The engines take turns run by run, so a change in load hits all."""
    times: dict = {name: [] for name in engines}
    found: dict = {}
    for _ in range(RUNS):
        for name, apply in engines.items():
            gm = copy.deepcopy(original)
            # Collect now, untimed: otherwise a collection the copy (or the other engine) made
            # due lands in this engine's time. Each still pays the collections it causes.
            gc.collect()
            start = time.process_time()
            matches = apply(gm)
            times[name].append(time.process_time() - start)
            collectives = {
                kind: len(gm.graph.find_nodes(op="call_function", target=t))
                for kind, t in COLLECTIVES.items()
            }
            found[name] = (matches, collectives)
    return {
        name: (found[name][0], statistics.median(times[name]), found[name][1]) for name in engines
    }


def profile_fxsp(original: GraphModule, top: int = 25) -> None:
    """Where the time of all passes goes on `original`: cProfile's top entries."""
    profiler = cProfile.Profile()
    gm = copy.deepcopy(original)
    profiler.enable()
    run_fxsp_passes(gm)
    profiler.disable()
    print(f"\ncProfile of all passes, top {top} by cumulative time:")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


def raw_passes_table(layer_counts: tuple) -> dict:
    """Section 1: all passes against RawPatternMatcherSP, per spelling and layer count."""
    from benchmarks.baseline_pattern_matcher import RawPatternMatcherSP

    print(
        "1. all passes (raise, SP, clean-up, lower) on raw post-grad graphs, CPU ms, median of "
        f"{RUNS}"
    )
    print(
        "fxsp ms: run_passes, its report's golden texts unread; +texts: read too (a compile "
        "with Inductor's cache on reads them to save the report)"
    )
    header = (
        "norm",
        "layers",
        "nodes",
        "matches",
        "fxsp ms",
        "+texts ms",
        "matcher ms",
        "speed-up",
        "+texts",
        "fxsp ms/layer",
        "same result",
    )
    print("{:>5} {:>6} {:>6} {:>11} {:>8} {:>9} {:>10} {:>8} {:>7} {:>13} {:>11}".format(*header))
    results: dict = {}
    for norm in SPELLINGS:
        baseline = RawPatternMatcherSP(GROUP, WORLD, RANK, norm=norm)
        for layers in layer_counts:
            graph = post_grad_graph(layers, norm)
            timed = timed_apply(
                graph,
                {
                    "fxsp": run_fxsp_passes,
                    "fxsp+texts": run_fxsp_passes_and_texts,
                    "baseline": baseline.apply,
                },
            )
            (fxsp_matches, fxsp_s, fxsp_left), (baseline_matches, baseline_s, baseline_left) = (
                timed["fxsp"],
                timed["baseline"],
            )
            texts_s = timed["fxsp+texts"][1]
            expected = 2 * layers + 1  # first + (2 * layers - 1) middle + last
            same = (
                fxsp_matches == baseline_matches == expected
                and fxsp_left == baseline_left
                and fxsp_left["c10d_all_reduce"] == 0
                and timed["fxsp+texts"][::2] == timed["fxsp"][::2]
            )
            results[norm, layers] = {
                "fxsp": fxsp_s,
                "fxsp+texts": texts_s,
                "baseline": baseline_s,
                "graph": graph,
            }
            print(
                f"{norm:>5} {layers:>6} {len(graph.graph.nodes):>6} "
                f"{fxsp_matches:>5}/{baseline_matches:<5} "
                f"{fxsp_s * 1e3:>8.1f} {texts_s * 1e3:>9.1f} {baseline_s * 1e3:>10.1f} "
                f"{baseline_s / fxsp_s:>7.1f}x {baseline_s / texts_s:>6.1f}x "
                f"{fxsp_s / layers * 1e3:>13.2f} {'yes' if same else 'NO':>11}",
                flush=True,
            )
    return results


# ---------------------------------------------------------------------------------------------


def plot(raw: dict, ir: dict, fxsp_registration: float, baseline_registration: float) -> None:
    def draw(axes) -> None:
        apply_ax, registration_ax = axes
        for i, norm in enumerate(SPELLINGS):
            layers = sorted(n for (spelling, n) in raw if spelling == norm)
            apply_ax.plot(
                layers,
                [raw[norm, n]["fxsp"] * 1e3 for n in layers],
                "o-",
                color=f"C{2 * i}",
                label=f"fxsp all passes ({norm} norms)",
            )
            apply_ax.plot(
                layers,
                [raw[norm, n]["baseline"] * 1e3 for n in layers],
                "s--",
                color=f"C{2 * i + 1}",
                label=f"pattern matcher ({norm} norms)",
            )
        layers = sorted(ir)
        apply_ax.plot(
            layers,
            [ir[n]["fxsp"] * 1e3 for n in layers],
            "^:",
            color="gray",
            label="fxsp SP rules alone (IR graph)",
        )
        # log-log: a linear-time pass is a line of slope 1
        apply_ax.set(
            xlabel="Llama layers",
            ylabel=f"CPU ms (median of {RUNS})",
            xscale="log",
            yscale="log",
            title="SP on raw post-grad graphs",
        )
        apply_ax.set_xticks(layers, [str(n) for n in layers])
        apply_ax.grid(True, which="both", alpha=0.3)
        apply_ax.legend(fontsize="small")
        bars = registration_ax.bar(
            ["fxsp", "pattern matcher"],
            [fxsp_registration * 1e3, baseline_registration * 1e3],
            color=["C0", "C1"],
        )
        registration_ax.bar_label(bars, fmt="%.3g ms")
        registration_ax.set(
            ylabel=f"ms (fresh process, median of {REGISTRATION_PROCESSES})",
            yscale="log",
            title="SP pass: rule registration",
        )

    save_plot("sp_pass_speed", draw, panels=2)


def ir_rules_table() -> dict:
    """Section 3: the SP rules alone on IR graphs against PatternMatcherSP on the same graphs."""
    from benchmarks.baseline_pattern_matcher import PatternMatcherSP

    baseline = PatternMatcherSP(GROUP, WORLD, RANK)
    print(f"3. SP rules alone (no raising, no lowering) on IR graphs, CPU ms, median of {RUNS}")
    header = (
        "layers",
        "nodes",
        "matches",
        "fxsp ms",
        "matcher ms",
        "speed-up",
        "fxsp ms/layer",
        "same result",
    )
    print("{:>6} {:>6} {:>11} {:>8} {:>10} {:>8} {:>13} {:>11}".format(*header))
    results = {}
    for layers in LAYER_COUNTS:
        graph = trace_ir_llama(layers)
        timed = timed_apply(graph, {"fxsp": apply_fxsp, "baseline": baseline.apply})
        (fxsp_matches, fxsp_s, fxsp_left), (baseline_matches, baseline_s, baseline_left) = (
            timed["fxsp"],
            timed["baseline"],
        )
        expected = 2 * layers + 1  # first + (2 * layers - 1) middle + last
        same = fxsp_matches == baseline_matches == expected and fxsp_left == baseline_left
        results[layers] = {"fxsp": fxsp_s, "baseline": baseline_s}
        print(
            f"{layers:>6} {len(graph.graph.nodes):>6} {fxsp_matches:>5}/{baseline_matches:<5} "
            f"{fxsp_s * 1e3:>8.1f} {baseline_s * 1e3:>10.1f} {baseline_s / fxsp_s:>7.1f}x "
            f"{fxsp_s / layers * 1e3:>13.2f} {'yes' if same else 'NO':>11}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registration", choices=("fxsp", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile", action="store_true", help="profile all passes at the largest layer count"
    )
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=list(RAW_LAYER_COUNTS),
        help="layer counts of the raw post-grad graphs",
    )
    args = parser.parse_args()
    if args.registration:  # the child process of `registration`
        print(json.dumps(register_fxsp() if args.registration == "fxsp" else register_baseline()))
        return

    # deepcopy of a GraphModule warns about a pytree deprecation inside torch: noise here.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=RANK, world_size=WORLD)
    raw = raw_passes_table(tuple(args.layers))
    few, most = min(args.layers), max(args.layers)
    print()
    for norm in SPELLINGS:
        per_layer = [raw[norm, n]["fxsp"] / n * 1e3 for n in args.layers]
        print(
            f"{norm}: fxsp t({most})/t({few}) = "
            f"{raw[norm, most]['fxsp'] / raw[norm, few]['fxsp']:.1f} "
            f"(linear: {most / few:.0f}); ms/layer {min(per_layer):.2f} to {max(per_layer):.2f}; "
            f"speed-up at {most} layers "
            f"{raw[norm, most]['baseline'] / raw[norm, most]['fxsp']:.1f}x, "
            f"{raw[norm, most]['baseline'] / raw[norm, most]['fxsp+texts']:.1f}x "
            "with the texts read "
            "(goal >= 20x)"
        )

    fxsp_reg, baseline_reg = registration("fxsp"), registration("baseline")
    print(
        f"\n2. registration (fresh process, median of {REGISTRATION_PROCESSES}): "
        f"fxsp {fxsp_reg['seconds'] * 1e3:.2f} ms for {fxsp_reg['rules']} rules "
        f"(module body, then sp_rules() {fxsp_reg['build_seconds'] * 1e3:.3f} ms); "
        f"pattern matcher {baseline_reg['seconds'] * 1e3:.0f} ms for {baseline_reg['rules']} "
        f"register_replacement calls ({baseline_reg['distinct']} distinct patterns); "
        f"{baseline_reg['seconds'] / fxsp_reg['seconds']:.0f}x\n"
    )

    ir = ir_rules_table()
    print(
        f"SP rules alone: t(128)/t(16) = {ir[128]['fxsp'] / ir[16]['fxsp']:.2f} (linear: 8); "
        f"speed-up at 80 layers {ir[80]['baseline'] / ir[80]['fxsp']:.1f}x"
    )
    plot(raw, ir, fxsp_reg["seconds"], baseline_reg["seconds"])
    if args.profile:
        profile_fxsp(raw["hf", most]["graph"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
