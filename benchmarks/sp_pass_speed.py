"""SP pass speed: fxsp's SP rules against the same rewrite on Inductor's pattern matcher.

    .venv/bin/python benchmarks/sp_pass_speed.py [--profile]

The baseline (benchmarks/baseline_pattern_matcher.py) is the SP rewrite as vLLM writes it:
`register_replacement(..., fwd_only, ...)` per variant, epsilon and dtype. Both engines get the
same graphs, synthetic Llama-style post-grad graphs on fxsp's IR (benchmarks/ir_llama.py) of 4,
16, 32, 80 and 128 layers: the level vLLM's patterns and fxsp's SP rules each match on (see the
baseline's docstring for why that is the fair comparison). A fake process group of 2 ranks;
small tensors, since the graph is measured, not the math.

Measured, in one process unless said otherwise:
- registration: in a fresh process each time (median of 5 processes per engine), the rule
  module's body (bytecode compiled beforehand, as Python's cache has it; dependencies imported)
  plus building the rule set. fxsp: fxsp/patterns/sp.py, whose patterns are module-level data,
  and `sp_rules(config)`. Baseline: its module and `PatternMatcherSP(...)`, which traces and
  registers 24 patterns; one throw-away trace runs first, so Inductor's lazy imports are not
  counted against it.
- apply: median of 5 runs, each on a fresh deep copy of the graph (the copy is not timed); the
  two engines take turns run by run, so drifting machine load hits both.
  fxsp: `sp_rules(config).apply(graph)` plus its dead-code removal (the gathers its rewrites
  leave unused); baseline: `PatternMatcherPass.apply` plus its residual-slice clean-up.
- matches, and whether both leave the same collectives (reduce-scatters, all-gathers, no
  all-reduce): a check that they did the same rewrite.

Goals (issue 7): registration >= 100x faster, apply >= 5x faster at 80 layers, fxsp's apply time
linear in layers. `--profile` prints where fxsp's apply time goes at 80 layers.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import importlib.util
import json
import pstats
import statistics
import subprocess
import sys
import time
import types
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.fx import GraphModule

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks.*` from a script

from benchmarks.ir_llama import GROUP, trace_ir_llama
from benchmarks.plotting import save_plot
from fxsp.cleanup import remove_dead_code
from fxsp.patterns.sp import SPConfig, sp_rules

LAYER_COUNTS = (4, 16, 32, 80, 128)
RUNS = 5
REGISTRATION_PROCESSES = 5
WORLD, RANK = 2, 0
CONFIG = SPConfig(group=GROUP, world=WORLD, rank=RANK, min_tokens=0)

c10d = torch.ops._c10d_functional
COLLECTIVES = {"reduce_scatter": c10d.reduce_scatter_tensor.default,
               "all_gather": c10d.all_gather_into_tensor.default,
               "all_reduce": torch.ops.fxsp.all_reduce.default}


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
    """fxsp/patterns/sp.py's body (its patterns are module-level data) plus `sp_rules`."""
    module, body = run_rule_module("fxsp.patterns.sp", ROOT / "fxsp" / "patterns" / "sp.py")
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
    module, body = run_rule_module("benchmarks.baseline_pattern_matcher",
                                   ROOT / "benchmarks" / "baseline_pattern_matcher.py")
    start = time.perf_counter()
    sp = module.PatternMatcherSP(GROUP, WORLD, RANK)
    build = time.perf_counter() - start
    return {"seconds": body + build, "build_seconds": build, "rules": sp.registrations,
            "distinct": sp.distinct}


def registration_in_fresh_process(engine: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--registration", engine], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def registration(engine: str) -> dict:
    runs = [registration_in_fresh_process(engine) for _ in range(REGISTRATION_PROCESSES)]
    return {**runs[0], "seconds": statistics.median(r["seconds"] for r in runs),
            "build_seconds": statistics.median(r["build_seconds"] for r in runs)}


# ---------------------------------------------------------------------------------------------
# Apply, in this process
# ---------------------------------------------------------------------------------------------


def apply_fxsp(gm: GraphModule) -> int:
    report = sp_rules(CONFIG).apply(gm.graph)
    remove_dead_code(gm.graph)
    return sum(report.counts.values())


def timed_apply(original: GraphModule, engines: dict) -> dict:
    """Per engine: (matches, median seconds, collectives left) of applying it to fresh copies
    of `original`. The engines take turns run by run, so a change in machine load hits all."""
    times: dict = {name: [] for name in engines}
    found: dict = {}
    for _ in range(RUNS):
        for name, apply in engines.items():
            gm = copy.deepcopy(original)
            start = time.perf_counter()
            matches = apply(gm)
            times[name].append(time.perf_counter() - start)
            collectives = {kind: len(gm.graph.find_nodes(op="call_function", target=t))
                           for kind, t in COLLECTIVES.items()}
            found[name] = (matches, collectives)
    return {name: (found[name][0], statistics.median(times[name]), found[name][1]) for name in engines}


def profile_fxsp(layers: int = 80, top: int = 12) -> None:
    """Where fxsp's apply time goes: the share spent computing fake values for new nodes
    (fxsp/builder.py → fxsp/fake.py), per op, then cProfile's top entries."""
    import fxsp.builder

    original = trace_ir_llama(layers)
    fake_value = fxsp.builder.fake_value
    per_target: dict = defaultdict(lambda: [0, 0.0])

    def timed_fake_value(target, args, kwargs):
        start = time.perf_counter()
        try:
            return fake_value(target, args, kwargs)
        finally:
            per_target[getattr(target, "__name__", str(target))][0] += 1
            per_target[getattr(target, "__name__", str(target))][1] += time.perf_counter() - start

    fxsp.builder.fake_value = timed_fake_value  # instruments this process only
    try:
        start = time.perf_counter()
        apply_fxsp(copy.deepcopy(original))
        total = time.perf_counter() - start
    finally:
        fxsp.builder.fake_value = fake_value
    fake_total = sum(seconds for _, seconds in per_target.values())
    print(f"\nfxsp apply at {layers} layers: {total * 1e3:.0f} ms, of which fake-value propagation for "
          f"new nodes {fake_total * 1e3:.0f} ms ({fake_total / total:.0%}):")
    for name, (calls, seconds) in sorted(per_target.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:<40} {calls:>5} nodes {seconds * 1e3:>8.1f} ms  {seconds / calls * 1e3:.2f} ms each")

    profiler = cProfile.Profile()
    gm = copy.deepcopy(original)
    profiler.enable()
    apply_fxsp(gm)
    profiler.disable()
    print(f"\ncProfile of the same, top {top} by cumulative time:")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


# ---------------------------------------------------------------------------------------------


def plot(results: dict, fxsp_registration: float, baseline_registration: float) -> None:
    layers = list(results)

    def draw(axes) -> None:
        apply_ax, registration_ax = axes
        apply_ax.plot(layers, [results[n]["fxsp"] * 1e3 for n in layers], "o-", label="fxsp rules")
        apply_ax.plot(layers, [results[n]["baseline"] * 1e3 for n in layers], "s-",
                      label="Inductor pattern matcher (vLLM-style)")
        # log-log: a linear-time pass is a line of slope 1
        apply_ax.set(xlabel="Llama layers", ylabel="apply time, ms (median of 5)", xscale="log",
                     yscale="log", title="SP pass: apply")
        apply_ax.set_xticks(layers, [str(n) for n in layers])
        apply_ax.grid(True, which="both", alpha=0.3)
        apply_ax.legend()
        bars = registration_ax.bar(["fxsp", "pattern matcher"],
                                   [fxsp_registration * 1e3, baseline_registration * 1e3],
                                   color=["C0", "C1"])
        registration_ax.bar_label(bars, fmt="%.3g ms")
        registration_ax.set(ylabel=f"ms (fresh process, median of {REGISTRATION_PROCESSES})", yscale="log",
                            title="SP pass: rule registration")

    save_plot("sp_pass_speed", draw, panels=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registration", choices=("fxsp", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="profile fxsp's apply at 80 layers")
    args = parser.parse_args()
    if args.registration:  # the child process of `registration`
        print(json.dumps(register_fxsp() if args.registration == "fxsp" else register_baseline()))
        return

    # deepcopy of a GraphModule warns about a pytree deprecation inside torch: noise here.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=RANK, world_size=WORLD)
    from benchmarks.baseline_pattern_matcher import PatternMatcherSP

    fxsp_reg, baseline_reg = registration("fxsp"), registration("baseline")
    print(f"registration (fresh process, median of {REGISTRATION_PROCESSES}): "
          f"fxsp {fxsp_reg['seconds'] * 1e3:.2f} ms for {fxsp_reg['rules']} rules "
          f"(module body, then sp_rules() {fxsp_reg['build_seconds'] * 1e3:.3f} ms); "
          f"pattern matcher {baseline_reg['seconds'] * 1e3:.0f} ms for {baseline_reg['rules']} "
          f"register_replacement calls ({baseline_reg['distinct']} distinct patterns); "
          f"{baseline_reg['seconds'] / fxsp_reg['seconds']:.0f}x\n")

    baseline = PatternMatcherSP(GROUP, WORLD, RANK)
    header = ("layers", "nodes", "matches", "fxsp ms", "matcher ms", "speed-up", "fxsp ms/layer",
              "same result")
    print("{:>6} {:>6} {:>11} {:>8} {:>10} {:>8} {:>13} {:>11}".format(*header))
    results = {}
    for layers in LAYER_COUNTS:
        graph = trace_ir_llama(layers)
        timed = timed_apply(graph, {"fxsp": apply_fxsp, "baseline": baseline.apply})
        (fxsp_matches, fxsp_s, fxsp_left), (baseline_matches, baseline_s, baseline_left) = \
            timed["fxsp"], timed["baseline"]
        expected = 2 * layers + 1  # first + (2 * layers - 1) middle + last
        same = fxsp_matches == baseline_matches == expected and fxsp_left == baseline_left
        results[layers] = {"fxsp": fxsp_s, "baseline": baseline_s}
        print(f"{layers:>6} {len(graph.graph.nodes):>6} {fxsp_matches:>5}/{baseline_matches:<5} "
              f"{fxsp_s * 1e3:>8.1f} {baseline_s * 1e3:>10.1f} {baseline_s / fxsp_s:>7.1f}x "
              f"{fxsp_s / layers * 1e3:>13.2f} {'yes' if same else 'NO':>11}")

    first, last = LAYER_COUNTS[0], LAYER_COUNTS[-1]
    growth = results[last]["fxsp"] / results[first]["fxsp"]
    per_layer = [results[n]["fxsp"] / n * 1e3 for n in LAYER_COUNTS]
    print(f"\nfxsp linearity: t({last})/t({first}) = {growth:.1f} (linear: {last / first:.0f}); "
          f"t(128)/t(16) = {results[128]['fxsp'] / results[16]['fxsp']:.2f} (linear: 8); "
          f"ms/layer {min(per_layer):.2f} to {max(per_layer):.2f}")
    registration_speedup = baseline_reg["seconds"] / fxsp_reg["seconds"]
    apply_speedup = results[80]["baseline"] / results[80]["fxsp"]
    plot(results, fxsp_reg["seconds"], baseline_reg["seconds"])
    print(f"\nsummary: registration {registration_speedup:.0f}x faster (goal >= 100x: "
          f"{'met' if registration_speedup >= 100 else 'MISSED'}); apply at 80 layers "
          f"{apply_speedup:.1f}x faster (goal >= 5x: {'met' if apply_speedup >= 5 else 'MISSED'}); "
          f"fxsp t(128)/t(16) = {results[128]['fxsp'] / results[16]['fxsp']:.2f} (linear: 8)")
    if args.profile:
        profile_fxsp()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
