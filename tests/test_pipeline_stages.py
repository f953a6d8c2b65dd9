"""Pipeline stages × TP: a stage boundary with the residual left sharded (4 gloo processes:
2 stages of 2 TP ranks) equals the unsplit eager model."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fxsp
from fxsp.runtime import gather_rows
from fxsp.sp.layout import block_bounds, padded_block_rows
from fxsp.testing.tp_llama import Spec, TPLlama
from tests.worlds import run_world

SPEC = Spec(layers=2)
ROWS = 7


class FirstStage(nn.Module):
    def __init__(self, model: TPLlama) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> tuple:
        hidden = self.model.embed_tokens(tokens)
        return self.model.run_layers(0, 1, hidden, hidden)


class SecondStage(nn.Module):
    def __init__(self, model: TPLlama) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.model.run_layers(1, SPEC.layers, hidden, residual)
        return self.model.final_norm(hidden + residual)


def two_stages(rank: int, world: int) -> float:
    stages = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    stage = rank // 2
    tp_group = stages[stage]
    model = TPLlama(SPEC, group=tp_group)
    tokens = model.example_input(ROWS)
    peer = rank + 2 if stage == 0 else rank - 2
    with torch.no_grad():
        if stage == 0:
            backend = fxsp.backend(tp_group, inner="eager", shard_outputs=True)
            hidden, residual_rows = torch.compile(FirstStage(model), backend=backend)(tokens)
            assert residual_rows.shape == (
                padded_block_rows(ROWS, 2),
                SPEC.hidden,
            )  # never gathered
            assert backend.reports[-1].counts["sp.sharded_outputs"] == 1
            dist.send(hidden.contiguous(), peer)
            dist.send(residual_rows.contiguous(), peer)
            return 0.0
        hidden = torch.empty(ROWS, SPEC.hidden)
        residual_rows = torch.empty(padded_block_rows(ROWS, 2), SPEC.hidden)
        dist.recv(hidden, peer)
        dist.recv(residual_rows, peer)
        residual = gather_rows(residual_rows, (ROWS, SPEC.hidden), tp_group)
        result = torch.compile(SecondStage(model), backend=fxsp.backend(tp_group, inner="eager"))(
            hidden, residual
        )
        reference = model(tokens)  # the unsplit model on this stage's TP group, eager
        return (result - reference).abs().max().item()


def test_sharded_residual_across_a_stage_boundary_equals_eager():
    errors = run_world(4, two_stages, timeout=240)
    assert max(errors) <= 2e-4, errors


def test_gather_rows_rejects_a_wrong_shard(fake_pg):
    with pytest.raises(ValueError, match="has shape"):
        gather_rows(torch.empty(3, 8), (7, 8))


@pytest.mark.parametrize("rows, tp", [(8, 2), (7, 2), (7, 3), (1, 3), (128, 3)])
def test_row_blocks_tile_the_rows_padded_by_less_than_one_row_per_rank(rows, tp):
    per_rank = padded_block_rows(rows, tp)
    blocks = [block_bounds(per_rank, rank) for rank in range(tp)]
    assert blocks[0][0] == 0 and all(a[1] == b[0] for a, b in pairwise(blocks))
    assert rows <= blocks[-1][1] < rows + tp


def test_row_block_layout_builds_graph_arithmetic_for_symbolic_rows():
    """The SP rewrites ask the same layout for graph nodes: the ops are recorded, not run."""
    calls = []

    def record(fn, *args):
        calls.append((fn.__name__, args))
        return f"{fn.__name__}{args}"

    per_rank = padded_block_rows("rows", 3, record)
    block_bounds(per_rank, 2, record)
    assert [name for name, _ in calls] == ["add", "floordiv", "mul", "add"]
    assert calls[1][1] == ("add('rows', 2)", 3)
