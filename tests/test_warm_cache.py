"""Users' Inductor caches are warm: a cache hit skips fxsp's pass, and fxsp must still report
what the compiled graph does (read back from the JSON the filling run saved), and the rank guard
must still compare real decisions.

In-process tests reuse the cache after `torch._dynamo.reset()` (an AOT autograd and FX graph
cache hit, as in a fresh process); one test uses two fresh processes. The fake process group's
collectives leave their outputs unwritten, so outputs here are not compared: numerics over a warm
cache are test_sp_numerics.py's, on real gloo worlds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import fxsp
from fxsp.runtime.guard import RankGuard
from fxsp.testing.tp_llama import Spec, TPLlama


def compile_model(model: torch.nn.Module, x: torch.Tensor, grad: bool = False, **options) -> tuple:
    """(backend, output, the rank guards the backend returned) for one compile of `model`."""
    backend = fxsp.backend(None, **options)
    guards = []

    def spy(gm, inputs):
        fn = backend(gm, inputs)
        guards.append(fn)
        return fn

    with torch.set_grad_enabled(grad):
        out = torch.compile(model, backend=spy)(x)
    return backend, out, guards


def plain(reports: list) -> list:
    return [r.to_json() for r in reports]


def reports_dir() -> Path:
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "fxsp_reports"


def test_a_cache_hit_reads_the_reports_back(fake_pg, caplog):
    model = TPLlama(Spec(layers=1))
    x = model.example_input(6)
    cold, _, cold_guards = compile_model(model, x, min_tokens=0, explain=True)
    assert len(cold.reports) == 1 and not cold.reports[0].cached
    assert cold.reports[0].counts["sp.middle"] == 1
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with caplog.at_level("INFO", logger="fxsp"):
        warm, _, warm_guards = compile_model(model, x, min_tokens=0, explain=True)
    assert torch._dynamo.utils.counters["aot_autograd"]["autograd_cache_hit"] == 1
    assert [r.cached for r in warm.reports] == [True]
    assert plain(warm.reports) == plain(cold.reports)
    assert warm.reports[0].explain() == cold.reports[0].explain()
    (cold_guard,), (warm_guard,) = cold_guards, warm_guards
    assert isinstance(warm_guard, RankGuard)
    assert (warm_guard.facts, warm_guard.decisions) == (cold_guard.facts, cold_guard.decisions)
    logged = [r.message for r in caplog.records if r.message.startswith("near-miss ")]
    assert logged == [
        f"near-miss {near}" for near in cold.reports[0].misses.values()
    ]  # explain=True


def test_a_hit_whose_report_file_is_gone_compiles_again(fake_pg):
    model = TPLlama(Spec(layers=1))
    x = model.example_input(6)
    cold, _, _ = compile_model(model, x, min_tokens=0)
    (saved,) = reports_dir().iterdir()
    saved.unlink()
    torch._dynamo.reset()
    again, _, _ = compile_model(model, x, min_tokens=0)
    (report,) = again.reports
    assert not report.cached  # the pass ran again
    assert report.counts == cold.reports[0].counts and report.after == cold.reports[0].after
    assert [p.name for p in reports_dir().iterdir()] == [saved.name]  # and saved it again


def test_an_unreadable_report_file_counts_as_missing(fake_pg):
    model = TPLlama(Spec(layers=1))
    x = model.example_input(6)
    cold, _, _ = compile_model(model, x, min_tokens=0)
    (saved,) = reports_dir().iterdir()
    saved.write_text('{"format": 1, "compile": [{"counts": ')
    torch._dynamo.reset()
    again, _, _ = compile_model(model, x, min_tokens=0)
    assert [r.cached for r in again.reports] == [False]
    assert again.reports[0].counts == cold.reports[0].counts


def test_symbolic_rows_warm_give_both_variants_reports(fake_pg):
    """RowDispatch: the SP variant always compiles afresh (its symbolic row thresholds come off
    the pass); the non-SP variant may come from the cache, report included."""
    model = TPLlama(Spec(layers=1))
    x = model.example_input(8)
    torch._dynamo.mark_dynamic(x, 0)

    def run() -> fxsp.Backend:
        backend, _, (guard,) = compile_model(model, x, min_tokens=6)
        assert type(guard.fn).__name__ == "RowDispatch"
        return backend

    cold = run()
    torch._dynamo.reset()
    warm = run()
    assert [r.cached for r in cold.reports] == [False, False]
    assert [r.cached for r in warm.reports] == [False, True]
    assert (
        warm.reports[0].counts == cold.reports[0].counts and warm.reports[0].counts["sp.first"] == 1
    )
    assert plain(warm.reports[1:]) == plain(cold.reports[1:])


def test_training_reports_the_lazily_compiled_backward_too(fake_pg):
    model = TPLlama(Spec(layers=1, prompt_embeds=True))
    x = model.example_input(6).requires_grad_()

    def run() -> tuple:
        backend, out, (guard,) = compile_model(model, x, grad=True, min_tokens=0)
        at_compile = len(backend.reports)
        out.sum().backward()
        return backend, at_compile, guard.decisions

    cold, cold_at_compile, cold_decisions = run()
    torch._dynamo.reset()
    warm, warm_at_compile, warm_decisions = run()
    assert (cold_at_compile, len(cold.reports)) == (1, 2)  # the backward compiles on first use
    assert (warm_at_compile, len(warm.reports)) == (2, 2)  # read back with the forward's
    assert all(r.cached for r in warm.reports)
    assert plain(warm.reports) == plain(cold.reports)
    assert warm_decisions == cold_decisions  # the forward's only, as on a cold rank


CHILD = r"""
import json, sys
import torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=3)
import fxsp
from fxsp.testing.tp_llama import Spec, TPLlama
model = TPLlama(Spec(layers=1, vocab=128, batched=True))
backend = fxsp.backend(None, min_tokens=0)
with torch.no_grad():
    torch.compile(model, backend=backend)(model.example_input(10))
print("REPORTS " + json.dumps({"cached": [r.cached for r in backend.reports],
                               "reports": [r.to_json() for r in backend.reports]}))
"""


def run_child(cache: str) -> dict:
    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=cache,
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORTS ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("REPORTS "))


def test_two_fresh_processes_over_one_cache_give_equal_reports(tmp_path):
    cold, warm = run_child(str(tmp_path)), run_child(str(tmp_path))
    assert cold["cached"] == [False] and warm["cached"] == [True]
    assert warm["reports"] == cold["reports"]
    assert cold["reports"][0]["counts"]["sp.middle"] == 1
