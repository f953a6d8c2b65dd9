"""Ranks that rewrite a graph differently must fail fast with a clear error, not hang."""

from __future__ import annotations

import time

import torch

import fxsp
from fxsp import pipeline
from fxsp.rules import RuleSet
from fxsp.runtime.guard import RankMismatchError, fingerprint
from fxsp.testing.tp_llama import Spec, TPLlama
from tests.worlds import run_world


def diverge(rank: int, world: int, how: str) -> tuple:
    """Rank 1 compiles differently; returns (error text or None, seconds the call took)."""
    options = {"inner": "eager"}
    if how == "options" and rank == 1:
        options["min_tokens"] = 10**6  # rank 1 keeps its all-reduces
    if how == "decisions" and rank == 1:  # same inputs and options, a different rewrite
        pipeline.sp_rules = lambda cfg, thresholds=None: RuleSet("sp", [])
    model = TPLlama(Spec(layers=1))
    compiled = torch.compile(model, backend=fxsp.backend(None, **options))
    tokens = model.example_input(6)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            compiled(tokens)
    except RankMismatchError as e:
        return str(e), time.perf_counter() - start
    return None, time.perf_counter() - start


def test_divergent_options_fail_fast_on_every_rank():
    for error, seconds in run_world(2, diverge, "options", timeout=120):
        assert error is not None and "ranks [1]" in error and "inputs/options" in error
        assert seconds < 30  # compile included; a hang would hit the world's timeout


def test_divergent_rewrite_decisions_fail_fast_on_every_rank():
    for error, seconds in run_world(2, diverge, "decisions", timeout=120):
        assert error is not None and "ranks [1]" in error and "rewrite decisions" in error
        assert seconds < 30


def test_agreeing_ranks_run():
    for error, _ in run_world(2, diverge, "none", timeout=120):
        assert error is None


def test_fingerprint_is_stable_and_nonzero():
    assert fingerprint("a", 1) == fingerprint("a", 1) != fingerprint("a", 2)
    assert fingerprint() != 0
