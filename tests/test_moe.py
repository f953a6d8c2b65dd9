"""MoE numerics on real gloo worlds: a TP mixture-of-experts model compiled with fxsp equals
eager on every rank, and SP rewrites every all-reduce → norm of it.

Why SP is exact here: every rank routes identically (replicated router on identical inputs),
so the MoE's all-reduce is a plain sum of per-rank partials, like a dense MLP's. SP replaces
all-reduce → norm by reduce-scatter → norm of this rank's rows → all-gather; the router and the
experts read the all-gathered (full, identical) rows. Nothing MoE-specific is matched or needed.
"""

from __future__ import annotations

import time

import pytest
import torch

import fxsp
from fxsp.testing.tp_moe import MoESpec, TPMoE
from tests.worlds import run_world

BASE = MoESpec()
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 6e-2}


def expected_counts(spec: MoESpec) -> dict:
    """SP rule matches. Norms in order: per layer the input norm (with attention) and the post
    norm, then the final norm. The first follows the embedding's all-reduce, whose output is
    also the residual; each later one follows `residual + all_reduce(...)`; the final norm's
    residual output is dead."""
    norms = spec.layers * (2 if spec.attention else 1) + 1
    return {"sp.first": 1, "sp.middle": norms - 2, "sp.last": 1}


def compile_and_compare(rank: int, world: int, cases: list) -> list:
    """For each (spec, rows list, inner): max |compiled - eager|, rule counts, seconds."""
    out = []
    for spec, rows_list, inner in cases:
        torch._dynamo.reset()
        model = TPMoE(spec)
        backend = fxsp.backend(None, inner=inner)
        compiled = torch.compile(model, backend=backend)
        for rows in rows_list:
            start = time.perf_counter()
            inputs = model.example_input(rows)
            seen = len(backend.reports)
            with torch.no_grad():
                reference, result = model(inputs), compiled(inputs)
            counts: dict = {}
            for report in backend.reports[seen:]:
                for name, n in report.counts.items():
                    if n and name.startswith("sp."):
                        counts[name] = counts.get(name, 0) + n
            assert result.shape == reference.shape, (result.shape, reference.shape)
            error = (result.float() - reference.float()).abs().max().item()
            out.append((spec, rows, inner, error, counts, time.perf_counter() - start))
    return out


def check(results_by_rank: list) -> None:
    for rank, results in enumerate(results_by_rank):
        for spec, rows, inner, error, counts, _ in results:
            where = f"rank {rank}, rows {rows}, inner {inner}, {spec}"
            assert error <= TOLERANCE[spec.dtype], f"max error {error} at {where}"
            assert counts == expected_counts(spec), f"{counts} at {where}"


def test_moe_two_ranks_equals_eager():
    cases = [
        (BASE, [1, 5, 16], "eager"),
        (BASE.with_(dispatch="dense", shared_expert=True, norm_topk_prob=False, batched=True),
         [6], "eager"),
        (BASE.with_(attention=False, layers=3), [7], "eager"),
        (BASE, [5], "inductor"),
    ]
    check(run_world(2, compile_and_compare, cases))


def test_moe_three_ranks_equals_eager():
    check(run_world(3, compile_and_compare, [(BASE.with_(shared_expert=True), [7], "eager")]))
