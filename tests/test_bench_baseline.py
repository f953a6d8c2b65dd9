"""The pattern-matcher SP baseline of benchmarks/sp_pass_speed.py is a correct rewrite.

On a real 2-rank gloo world: the IR Llama graph rewritten by the baseline, run with each rank's
weight shards, equals the eager computation on every rank; with the first all-reduce in the
graph and without it (prompt embeddings: the residual stays replicated, the case vLLM's [0:L]
slice got wrong on rank 1).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.baseline_pattern_matcher import PatternMatcherSP
from benchmarks.ir_llama import HIDDEN, ROWS, ir_llama, layer_weights, trace_ir_llama
from tests.worlds import run_world

LAYERS = 2


def rewrite_and_compare(rank: int, world: int) -> list:
    """(prompt_embeds, matches, reduce-scatters, max |rewritten - eager|) per case."""
    sp = PatternMatcherSP("0", world, rank)
    results = []
    for prompt_embeds in (False, True):
        gm = trace_ir_llama(LAYERS, prompt_embeds=prompt_embeds)
        matches = sp.apply(gm)
        gm.recompile()
        scatters = len(
            gm.graph.find_nodes(
                op="call_function", target=torch.ops._c10d_functional.reduce_scatter_tensor.default
            )
        )
        # A partial embedding sum differs per rank; prompt embeddings are the same everywhere.
        g = torch.Generator().manual_seed(100 + (0 if prompt_embeds else rank))
        embeds = torch.randn(ROWS, HIDDEN, generator=g)
        weights = layer_weights(LAYERS, tp=world, rank=rank)
        with torch.no_grad():
            expected = ir_llama(embeds, weights, prompt_embeds=prompt_embeds)
            actual = gm(embeds, weights)
        results.append((prompt_embeds, matches, scatters, (actual - expected).abs().max().item()))
    return results


def test_baseline_equals_eager_on_gloo():
    for rank, results in enumerate(run_world(2, rewrite_and_compare, timeout=120)):
        for prompt_embeds, matches, scatters, error in results:
            where = f"rank {rank}, prompt_embeds={prompt_embeds}"
            # first + (2 * layers - 1) middle + last; no first without the embedding all-reduce
            assert matches == 2 * LAYERS + (0 if prompt_embeds else 1), where
            assert scatters == matches, where
            assert error < 1e-5, f"{where}: max error {error}"


@pytest.mark.parametrize("norm", ["hf", "torch"])
def test_raw_baseline_rewrites_every_norm_like_fxsp(fake_pg, norm):
    """On raw post-grad graphs (the baseline of the all-passes figure) the pattern matcher
    finds every norm of either spelling and leaves the collectives fxsp's passes leave."""
    import copy

    import torch.distributed as dist

    from benchmarks.baseline_pattern_matcher import RawPatternMatcherSP
    from benchmarks.post_grad_llama import post_grad_graph
    from fxsp.compile.passes import run_passes
    from fxsp.sp.rules import SPConfig

    c10d = torch.ops._c10d_functional
    group = dist.group.WORLD.group_name
    gm = post_grad_graph(LAYERS, norm)
    baseline, ours = copy.deepcopy(gm), copy.deepcopy(gm)
    matches = RawPatternMatcherSP(group, fake_pg, 0, norm=norm).apply(baseline)
    baseline.graph.lint()
    run_passes(ours.graph, SPConfig(group=group, world=fake_pg, rank=0, min_tokens=0))

    def collectives(g) -> list:
        return [
            len(g.graph.find_nodes(op="call_function", target=t))
            for t in (
                c10d.reduce_scatter_tensor.default,
                c10d.all_gather_into_tensor.default,
                c10d.all_reduce.default,
            )
        ]

    assert matches == 2 * LAYERS + 1
    assert collectives(baseline) == collectives(ours) == [matches, matches, 0]
