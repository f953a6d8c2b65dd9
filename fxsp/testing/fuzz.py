"""Differential fuzzing of TP graphs: random small TP programs, compiled with fxsp, checked by
oracles that hold for every program.

    python -m fxsp.testing.fuzz --examples 200 [--seed 0] [--world 2] [--numerics] [--warm]

A program is plain data (`Program`), drawn by hypothesis strategies (`programs()`: seeded and
shrinkable) and printed as the Python source it runs (`Program.source()`), so a shrunk
counterexample reads as a test. Each layer is a row-parallel matmul all-reduced, then ops between
the all-reduce and an RMSNorm (casts, scalar muls, views with -1, [T, H] <-> [1, T, H], clones,
full slices of the last dim), a residual add or not, readers of the residual outside the SP
region (returned, a sum over rows, a transpose, one row), sums of two all-reduces; rows static or
symbolic, TP dividing them or not, fp32 or bf16.

Oracles (`check`):
- compile   the graph compiles and runs under Inductor;
- bytes     each rank sends at most what plain TP sent, up to the padding rows;
- alive     no all-reduce stays beside the reduce-scatter that replaced it;
- explained every all-reduce left alone has a near-miss saying why;
- numerics  (`--numerics`) compiled equals eager on every rank of real gloo worlds;
- warm      (`--warm`) a cold and a warm Inductor cache give the same report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

BETWEEN = ("cast", "scale", "view", "view_minus_one", "clone", "slice_last")
READERS = ("none", "return", "row_sum", "transpose", "one_row")
ORACLES = ("compile", "bytes", "alive", "explained", "numerics", "warm")


@dataclass(frozen=True)
class Layer:
    between: tuple = ()  # ops between the all-reduce and the norm, in order
    residual: bool = True  # h = all_reduce(...) + residual before the norm
    reader: str = "none"  # who else reads the residual (outside the SP region)
    two_all_reduces: bool = False  # all_reduce(a) + all_reduce(b)
    hf_norm: bool = False  # HF's spelling, else F.rms_norm
    layer_norm: bool = False  # F.layer_norm with weight and bias instead of an RMSNorm


@dataclass(frozen=True)
class Program:
    layers: tuple = (Layer(),)
    rows: int = 8
    batched: bool = False  # [1, T, H] inputs, else [T, H]
    symbolic: bool = False  # mark the token dim dynamic
    bf16: bool = False
    hidden: int = 16

    def source(self) -> str:
        """The program as Python: `f(x, residual, w, norm_w)` over the TP group."""
        h, lines = self.hidden, []
        for i, layer in enumerate(self.layers):
            lines.append(f"# layer {i}")
            reduced = "all_reduce(x @ w)"
            if layer.two_all_reduces:
                reduced += " + all_reduce((x * 0.5) @ w)"
            lines.append(f"h = {reduced}")
            for op in layer.between:
                lines.append(_BETWEEN_SOURCE[op].format(h=h))
            if layer.residual:
                lines.append("h = h + residual.view(h.shape)")
            if layer.reader != "none":
                lines.append(f"extra.append({_READER_SOURCE[layer.reader]})")
            norm = (
                "(h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6))"
                ".to(h.dtype) * norm_w"
                if layer.hf_norm
                else f"F.rms_norm(h, ({h},), norm_w, 1e-6)"
            )
            if layer.layer_norm:
                norm = f"F.layer_norm(h, ({h},), norm_w, norm_w - 1, 1e-5)"
            lines.append(f"residual, x = h, {norm}")
            lines.append(f"x = x.reshape(-1, {h})")
        lines.append("return (x, *extra)")
        body = textwrap.indent("\n".join(lines), "    ")
        return f"def f(x, residual, w, norm_w):\n    extra = []\n{body}\n"

    def function(self, group: Any) -> Any:
        namespace = {
            "torch": torch,
            "F": torch.nn.functional,
            "all_reduce": lambda t: _all_reduce(t, group),
        }
        exec(self.source(), namespace)  # noqa: S102 - fxsp's own generated program
        return namespace["f"]

    def inputs(self, rank: int = 0) -> list[torch.Tensor]:
        """(x, residual, w, norm_w) of rank `rank`: x and the row-parallel weight w are this
        rank's own (its partial sums), the residual and the norm weight replicated, as TP has
        them."""
        own, shared = torch.Generator().manual_seed(1 + rank), torch.Generator().manual_seed(0)
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        h = self.hidden
        shape = (1, self.rows, h) if self.batched else (self.rows, h)
        return [
            torch.randn(shape, generator=own).to(dtype),
            torch.randn(shape, generator=shared).to(dtype),
            (torch.randn(h, h, generator=own) / h**0.5).to(dtype),
            (torch.rand(h, generator=shared) + 0.5).to(dtype),
        ]


_BETWEEN_SOURCE = {
    "cast": "h = h.float().to(h.dtype)",
    "scale": "h = h * 0.5",
    "view": "h = h.view(1, -1, {h}) if h.dim() == 2 else h.view(-1, {h})",
    "view_minus_one": "h = h.reshape(-1, {h}).view(1, -1, {h})",
    "clone": "h = h.clone()",
    "slice_last": "h = h[..., :{h}]",
}
_READER_SOURCE = {
    "return": "h",
    "row_sum": "h.sum(-2)",
    "transpose": "h.transpose(-1, -2)",
    "one_row": "h.reshape(-1, h.shape[-1])[0]",
}


def _all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(t, "sum", group)


def programs() -> Any:
    """Hypothesis strategy of `Program`s."""
    from hypothesis import strategies as st

    layer = st.builds(
        Layer,
        between=st.lists(st.sampled_from(BETWEEN), max_size=3).map(tuple),
        residual=st.booleans(),
        reader=st.sampled_from(READERS),
        two_all_reduces=st.booleans(),
        hf_norm=st.booleans(),
        layer_norm=st.booleans(),
    )
    return st.builds(
        Program,
        layers=st.lists(layer, min_size=1, max_size=3).map(tuple),
        rows=st.integers(1, 24),
        batched=st.booleans(),
        symbolic=st.booleans(),
        bf16=st.booleans(),
        hidden=st.sampled_from((16, 32)),
    )


@dataclass
class Verdict:
    """What the oracles said of one program: oracle -> why it failed."""

    violations: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


def compile_program(program: Program, world: int, **options: Any) -> tuple[Any, list]:
    """Compile and run `program` with fxsp on the current process group, with this rank's
    inputs (the output, the reports). Raises what the compile raises."""
    import fxsp

    torch._dynamo.reset()
    backend = fxsp.backend(None, min_tokens=0, **options)
    fn = program.function(dist.group.WORLD)
    args = program.inputs(dist.get_rank())
    if program.symbolic:
        for t in args[:2]:
            torch._dynamo.mark_dynamic(t, t.dim() - 2)
    with torch.no_grad():
        out = torch.compile(fn, backend=backend)(*args)
    return out, backend.reports


def check(program: Program, world: int) -> Verdict:
    """The in-process oracles, on the process group already initialised (fake, world ranks)."""
    verdict = Verdict()
    try:
        _, reports = compile_program(program, world)
    except Exception as e:  # noqa: BLE001 - any failure to compile is the finding
        first = (str(e).strip().splitlines() or [""])[0][:200]
        verdict.violations["compile"] = f"{type(e).__name__}: {first}"
        return verdict
    padded = -(-program.rows // world) * world
    for report in reports:
        before = report.traffic_before.sent_per_rank(world)
        after = report.traffic_after.sent_per_rank(world)
        if after * program.rows > before * padded * (1 + 1e-9):
            verdict.violations["bytes"] = f"{report.traffic_before} -> {report.traffic_after}"
        all_reduces = report.after.count("_c10d_functional.all_reduce.default(")
        scatters = report.after.count("reduce_scatter_tensor.default(")
        if all_reduces + scatters > report.before.count("_c10d_functional.all_reduce.default("):
            verdict.violations["alive"] = f"{all_reduces} all-reduces beside {scatters} scatters"
        if all_reduces and not any(name.startswith("sp.") for name in report.misses):
            verdict.violations["explained"] = "an all-reduce stayed without a near-miss"
    return verdict


@contextlib.contextmanager
def fake_world(world: int) -> Any:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


# --- numerics and warm cache: other processes ------------------------------------------------


def numerics(program: Program, world: int, tolerance: float | None = None) -> str | None:
    """Compiled against eager on every rank of a real gloo world of `world` ranks; None when
    equal, else what differed."""
    tol = tolerance if tolerance is not None else (3e-2 if program.bf16 else 1e-5)
    results = _run_module(["--replay", json.dumps(_as_json(program)), "--gloo", str(world)])
    worst = max(
        (float(line.split()[-1]) for line in results if line.startswith("error ")), default=None
    )
    if worst is None:
        return "no result: " + " | ".join(results[-3:])
    return None if worst <= tol else f"max |compiled - eager| {worst:.3g} > {tol}"


def warm_cache(program: Program, world: int) -> str | None:
    """Two fresh processes over one Inductor cache dir print the same report; None if so."""
    with tempfile.TemporaryDirectory() as cache:
        args = ["--replay", json.dumps(_as_json(program)), "--world", str(world), "--report"]
        cold, warm = (_run_module(args, cache) for _ in range(2))
    cold_report = [line for line in cold if line.startswith("report ")]
    warm_report = [line for line in warm if line.startswith("report ")]
    if not cold_report or cold_report != warm_report:
        return f"cold {cold_report[:1]} != warm {warm_report[:1]}"
    return None


def _run_module(args: list[str], cache: str | None = None) -> list[str]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache or tempfile.mkdtemp())
    out = subprocess.run(
        [sys.executable, "-m", "fxsp.testing.fuzz", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return (out.stdout + out.stderr).strip().splitlines()


def _as_json(program: Program) -> dict:
    return dataclasses.asdict(program)


def _from_json(data: dict) -> Program:
    layers = tuple(Layer(**{**lay, "between": tuple(lay["between"])}) for lay in data["layers"])
    return Program(**{**data, "layers": layers})


def _gloo_rank(rank: int, world: int, port: int, data: dict, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        program = _from_json(data)
        fn = program.function(dist.group.WORLD)
        args = program.inputs(rank)
        with torch.no_grad():
            reference = fn(*args)
            compiled, _ = compile_program(program, world)
        error = max((a.float() - b.float()).abs().max().item() for a, b in zip(reference, compiled))
        queue.put((rank, error))
    except BaseException as e:  # report, never hang the parent
        queue.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _gloo(data: dict, world: int) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_gloo_rank, args=(r, world, port, data, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank in sorted(results):
        value = results[rank]
        print(f"error {rank} {value}" if isinstance(value, float) else f"rank {rank}: {value}")


# --- the script ----------------------------------------------------------------------------


def run(examples: int, seed: int, world: int, slow: tuple = ()) -> tuple[int, Counter, dict]:
    """Draw `examples` programs and check them; (examples run, violations per oracle, the
    shrunk counterexample of each oracle that failed)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    failures: Counter = Counter()
    shrunk: dict = {}
    runs = 0

    def oracles(program: Program) -> Verdict:
        verdict = check(program, world)
        if verdict.ok and "numerics" in slow:
            why = numerics(program, world)
            if why:
                verdict.violations["numerics"] = why
        if verdict.ok and "warm" in slow:
            why = warm_cache(program, world)
            if why:
                verdict.violations["warm"] = why
        return verdict

    for oracle in ORACLES:  # one search per oracle, so each family shrinks on its own
        if oracle in ("numerics", "warm") and oracle not in slow:
            continue

        @hypothesis_seed(seed)
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=(Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
        )
        @given(programs())
        def search(program: Program) -> None:
            nonlocal runs
            runs += 1
            verdict = oracles(program)
            if oracle in verdict.violations:
                failures[oracle] += 1
                # Hypothesis replays the shrunk example last: what stays here is the smallest.
                shrunk[oracle] = (program, verdict.violations[oracle])
                raise AssertionError(verdict.violations[oracle])

        with contextlib.suppress(AssertionError):
            search()
    return runs, failures, shrunk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100, help="programs drawn per oracle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--numerics", action="store_true", help="also run gloo worlds (slow)")
    parser.add_argument("--warm", action="store_true", help="also compare warm caches (slow)")
    parser.add_argument("--replay", help=argparse.SUPPRESS)  # a Program as JSON
    parser.add_argument("--gloo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replay and args.gloo:
        _gloo(json.loads(args.replay), args.gloo)
        return 0
    if args.replay:
        program = _from_json(json.loads(args.replay))
        with fake_world(args.world):
            _, reports = compile_program(program, args.world)
        for report in reports:
            print("report", json.dumps([report.counts, report.collectives], sort_keys=True))
        return 0
    slow = tuple(name for name in ("numerics", "warm") if getattr(args, name))
    with fake_world(args.world):
        runs, failures, shrunk = run(args.examples, args.seed, args.world, slow)
    print(f"examples run: {runs} (world {args.world}, seed {args.seed})")
    for oracle in ORACLES:
        if oracle in ("numerics", "warm") and oracle not in slow:
            continue
        print(f"  {oracle:<10} violations: {failures[oracle]}")
    for oracle, (program, why) in shrunk.items():
        print(f"\nshrunk counterexample, {oracle}: {why}")
        settings = {k: v for k, v in _as_json(program).items() if k != "layers"}
        print(f"# {settings}\n{program.source()}")
    return 1 if shrunk else 0


if __name__ == "__main__":
    sys.exit(main())
