"""Ranks that rewrite a graph differently must fail fast with a clear error, not hang."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

import fxsp
from fxsp.compile import passes
from fxsp.dsl.rules import RuleSet
from fxsp.runtime.guard import RankGuard, RankMismatchError, fingerprint
from fxsp.testing.tp_llama import Spec, TPLlama
from tests.worlds import run_world


def diverge(rank: int, world: int, how: str) -> tuple:
    """Rank 1 compiles differently; returns (error text or None, seconds the call took)."""
    options = {"inner": "eager"}
    if how == "options" and rank == 1:
        options["min_tokens"] = 10**6  # rank 1 keeps its all-reduces
    if how == "decisions" and rank == 1:  # same inputs and options, a different rewrite
        passes.sp_rules = lambda cfg, thresholds=None: RuleSet("sp", [])
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
        assert error is not None and "ranks [1]" in error and "inputs/options differ too" in error
        assert seconds < 30  # compile included; a hang would hit the world's timeout


def test_divergent_rewrite_decisions_fail_fast_on_every_rank():
    for error, seconds in run_world(2, diverge, "decisions", timeout=120):
        assert error is not None and "ranks [1]" in error and "rewrite decisions" in error
        assert "from the same inputs/options" in error
        assert seconds < 30


def test_agreeing_ranks_run():
    for error, _ in run_world(2, diverge, "none", timeout=120):
        assert error is None


def test_fingerprint_is_stable_and_nonzero():
    assert fingerprint("a", 1) == fingerprint("a", 1) != fingerprint("a", 2)
    assert fingerprint() != 0


def diverge_on_warm_cache(rank: int, world: int, patch: bool) -> tuple:
    """Rank 1 rewrites differently when `patch`; with Inductor, so the graphs are cached."""
    if patch and rank == 1:
        passes.sp_rules = lambda cfg, thresholds=None: RuleSet("sp", [])
    model = TPLlama(Spec(layers=1))
    backend = fxsp.backend(None)
    compiled = torch.compile(model, backend=backend)
    try:
        with torch.no_grad():
            compiled(model.example_input(6))
    except RankMismatchError as e:
        return str(e), [r.cached for r in backend.reports]
    return None, [r.cached for r in backend.reports]


def test_divergent_ranks_fail_on_a_warm_cache_too(tmp_path):
    """Rank 1's divergent graph went into the cache. A later run whose code is fine hits that
    entry without running the pass: the guard compares the decisions saved with it."""
    for error, cached in run_world(
        2, diverge_on_warm_cache, True, cache_dir=str(tmp_path), timeout=300
    ):
        assert error is not None and "rewrite decisions" in error and cached == [False]
    for error, cached in run_world(
        2, diverge_on_warm_cache, False, cache_dir=str(tmp_path), timeout=300
    ):
        assert (
            error is not None and "ranks [1]" in error and "from the same inputs/options" in error
        )
        assert cached == [True]


class LayerNormTP(nn.Module):
    """A TP model with LayerNorms and a vocab-parallel embedding sharded as unevenly as the TP
    size makes it."""

    def __init__(self, vocab: int = 128, hidden: int = 24, inter: int = 48) -> None:
        super().__init__()
        tp, rank = dist.get_world_size(), dist.get_rank()
        torch.manual_seed(0)
        shards = torch.randn(vocab, hidden).tensor_split(tp)
        self.vocab_start = sum(len(shard) for shard in shards[:rank])
        self.embed = nn.Parameter(shards[rank].clone())
        self.norm, self.final_norm = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.up = nn.Parameter(
            (torch.randn(inter, hidden) / hidden**0.5).chunk(tp, 0)[rank].clone()
        )
        self.down = nn.Parameter(
            (torch.randn(hidden, inter) / inter**0.5).chunk(tp, 1)[rank].clone()
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.embed.shape[0]
        local = tokens - self.vocab_start
        mine = ((local >= 0) & (local < rows)).unsqueeze(-1).to(self.embed.dtype)
        h = funcol.all_reduce(
            F.embedding(local.clamp(0, rows - 1), self.embed) * mine, "sum", dist.group.WORLD
        )
        mlp = F.linear(F.gelu(F.linear(self.norm(h), self.up)), self.down)
        return self.final_norm(h + funcol.all_reduce(mlp, "sum", dist.group.WORLD))


def uneven_vocab(rank: int, world: int, kinds: list) -> list:
    """Per kind: (max |fxsp - eager|, SP matches, this rank's (facts, decisions) fingerprints,
    its vocab rows)."""
    return [_uneven_vocab(kind) for kind in kinds]


def _uneven_vocab(kind: str) -> tuple:
    torch._dynamo.reset()
    model = TPLlama(Spec(layers=1, vocab=128)) if kind == "llama" else LayerNormTP(vocab=128)
    tokens = torch.randint(0, 128, (7,), generator=torch.Generator().manual_seed(1))
    backend = fxsp.backend(None, min_tokens=0)
    guards = []

    def spy(gm, inputs):
        guards.append(backend(gm, inputs))
        return guards[-1]

    with torch.no_grad():
        expected, got = model(tokens), torch.compile(model, backend=spy)(tokens)
    (guard,) = guards
    assert isinstance(guard, RankGuard)
    sp = sum(v for r in backend.reports for k, v in r.counts.items() if k.startswith("sp."))
    return (
        (got - expected).abs().max().item(),
        sp,
        (guard.facts, guard.decisions),
        model.embed.shape[0],
    )


def test_uneven_shards_run_where_decisions_agree():
    """TP 3 over a vocab of 128: embedding shards of 43, 43 and 42 rows, so rank 2's facts
    differ; the ranks take the same decisions, so both models run and equal eager."""
    kinds = ["llama", "layer_norm"]
    by_rank = run_world(3, uneven_vocab, kinds, timeout=600)
    for kind, results in zip(kinds, zip(*by_rank)):  # one world for both: CI's time
        assert [rows for *_, rows in results] == [43, 43, 42]
        facts = {fingerprints[0] for _, _, fingerprints, _ in results}
        decisions = {fingerprints[1] for _, _, fingerprints, _ in results}
        assert len(facts) == 2 and len(decisions) == 1, (
            kind
        )  # rank 2's facts differ, not its decisions
        for error, sp, _, _ in results:
            assert error < 1e-5, (kind, error)
            assert sp > 0, (kind, sp)
