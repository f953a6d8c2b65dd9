"""SP numerics on real gloo worlds of 2 and 3 ranks: compiled with fxsp equals eager, every rank.

Each world run checks a list of cases (spec, row counts, inner compiler) so process start-up is
paid once per world, not per case.
"""

from __future__ import annotations

import pytest
import torch

import fxsp
from fxsp.testing.tp_llama import Spec, TPLlama
from tests.support import dtensor_mlp
from tests.worlds import run_world

BASE = Spec()
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 6e-2}


def expected_counts(spec: Spec) -> dict:
    """Rule matches in a TPLlama graph. Norms in order: per layer input and post norm, then
    the final norm. The first input norm follows the embedding's all-reduce (none with prompt
    embeddings); behind the graph break (after layer 0) the next input norm gets its all-reduce
    from the previous graph, so stays as it is; the final norm's residual output is dead. The
    graph before the break returns its last residual in full, so it stays plain TP: SP would
    all-gather that residual too, more bytes than the all-reduces."""
    fp8 = "_fp8" if spec.fp8 else ""
    middle = 2 * spec.layers - 1 - (2 if spec.graph_break else 0)
    return {
        f"sp.first{fp8}": 0 if spec.prompt_embeds or spec.graph_break else 1,
        f"sp.middle{fp8}": middle,
        "sp.last": 1 if spec.final_norm else 0,
        # Without a final norm the residual stream leaves through the last add, which takes its
        # shard (an all-gather of it would be more bytes than the all-reduce).
        "sp.end": 0 if spec.final_norm else 1,
    }


def compile_and_compare(rank: int, world: int, cases: list) -> list:
    """For each (spec, rows list, inner, dynamic[, backend options]): max |compiled - eager| and
    the rule counts. `dynamic` is False, True (mark_dynamic the token dims) or (min, max)."""
    out = []
    for spec, rows_list, inner, dynamic, *options in cases:
        torch._dynamo.reset()
        model = TPLlama(spec)
        backend = fxsp.backend(None, inner=inner, **(options[0] if options else {}))
        compiled = torch.compile(model, backend=backend)
        for rows in rows_list:
            inputs = model.example_input(rows)
            if dynamic:  # token dims only: dynamic=True would also trace float eps as an input
                bounds = dict(zip(("min", "max"), dynamic)) if isinstance(dynamic, tuple) else {}
                for dim in range(inputs.dim() - (1 if spec.prompt_embeds else 0)):
                    torch._dynamo.mark_dynamic(inputs, dim, **bounds)
            seen = len(backend.reports)
            with torch.no_grad():
                reference, result = model(inputs), compiled(inputs)
            counts: dict = {}
            for report in backend.reports[seen:]:
                for name, n in report.counts.items():
                    counts[name] = counts.get(name, 0) + n
            assert result.shape == reference.shape, (result.shape, reference.shape)
            error = (result.float() - reference.float()).abs().max().item()
            out.append((spec, rows, inner, error, counts))
    return out


def check(results_by_rank: list) -> None:
    for rank, results in enumerate(results_by_rank):
        for spec, rows, inner, error, counts in results:
            where = f"rank {rank}, rows {rows}, inner {inner}, {spec}"
            assert error <= TOLERANCE[spec.dtype], f"max error {error} at {where}"
            if counts:  # a recompile-free call (dynamic shapes) reports nothing new
                for name, n in expected_counts(spec).items():
                    assert counts.get(name, 0) == n, f"{name}: {counts} at {where}"


@pytest.mark.parametrize("world", [2, 3])
def test_llama_row_counts_equal_eager(world):
    rows = sorted({1, world - 1, 2 * world + 1, 64})
    cases = [
        (BASE, rows, "eager", False),
        (BASE.with_(batched=True), [2 * world + 2, 64], "eager", False),
        (BASE, [2 * world + 1], "inductor", False),
    ]
    check(run_world(world, compile_and_compare, cases))


@pytest.mark.parametrize("world", [2, 3])
def test_variants_equal_eager(world):
    odd = 2 * world + 1
    cases = [
        (BASE.with_(prompt_embeds=True), [1, odd, 64], "eager", False),
        (BASE.with_(fp8=True), [odd, 64], "eager", False),
        (BASE.with_(norm="torch", eps=1e-5), [odd], "eager", False),
        (BASE.with_(collective="inplace"), [odd], "eager", False),
        (BASE.with_(final_norm=False), [odd], "eager", False),
        (BASE.with_(dtype=torch.bfloat16), [odd, 64], "eager", False),
    ]
    check(run_world(world, compile_and_compare, cases))


def test_graph_break_and_dynamic_shapes_equal_eager():
    cases = [
        (BASE.with_(graph_break=True), [5, 64], "eager", False),
        (BASE, [5, 7, 64], "eager", True),
        (BASE.with_(batched=True), [6, 10], "inductor", True),
        # declared bounds: Dynamo then rejects any guard the SP rows would add (the trim's)
        (BASE, [9, 64], "inductor", (3, 4096)),
        # symbolic rows and a threshold: one SP and one plain variant, picked per call
        (BASE.with_(layers=1), [5, 9, 64], "inductor", True, {"min_tokens": 8}),
    ]
    check(run_world(2, compile_and_compare, cases))


def dtensor_compare(rank: int, world: int, rows: int) -> tuple:
    """An MLP stack parallelised with DTensor's ColwiseParallel / RowwiseParallel."""
    model, mesh = dtensor_mlp()
    backend = fxsp.backend(mesh, inner="eager")
    x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference, result = model(x), torch.compile(model, backend=backend)(x)
    counts = {
        k: v for r in backend.reports for k, v in r.counts.items() if v and k.startswith("sp.")
    }
    return (result - reference).abs().max().item(), counts


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_parallelize_module_equals_eager(world):
    for error, counts in run_world(world, dtensor_compare, 2 * world + 1):
        assert error <= 2e-4
        # x is a graph input (replicated): both norms after a matmul take the middle/last rules
        assert counts == {"sp.middle": 1, "sp.last": 1}, counts


def compare_with_cache(rank: int, world: int) -> tuple:
    """Inductor-compiled prompt-embeds model (rank-specific residual slices): error and cache
    hits."""
    from torch._dynamo.utils import counters

    model = TPLlama(BASE.with_(prompt_embeds=True, layers=1))
    inputs = model.example_input(5)
    with torch.no_grad():
        reference, result = model(inputs), torch.compile(model, backend=fxsp.backend(None))(inputs)
    hits = (
        counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    )
    return (result - reference).abs().max().item(), hits


def test_shared_cache_dir_second_run_equals_eager(tmp_path):
    """Inductor's FX graph cache key is the same on every rank: ranks sharing one cache dir must
    not share rank-specific graphs."""
    cache = str(tmp_path / "shared-cache")
    first = run_world(2, compare_with_cache, cache_dir=cache)
    second = run_world(2, compare_with_cache, cache_dir=cache)
    assert all(error <= 2e-4 for error, _ in first + second), (first, second)
    assert all(hits > 0 for _, hits in second), second  # the second run really came from the cache
