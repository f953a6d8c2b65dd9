"""The async-TP graph on real gloo worlds equals eager.

The fused symm_mem ops have no CPU kernels; fxsp.testing.async_tp lends them torch's reference
implementations (functional collectives, then matmuls), so the graph micro-pipeline TP produced
from fxsp's layout runs over gloo, every rank. The layout without async TP: test_sp_numerics.py.
"""

from __future__ import annotations

import pytest
import torch

import fxsp
from fxsp.testing.async_tp import mocked_symmetric_memory, totals
from fxsp.testing.tp_llama import Spec, TPLlama
from tests.worlds import run_world


def fused_equals_eager(rank: int, world: int, cases: list) -> list:
    out = []
    for spec, rows in cases:
        torch._dynamo.reset()
        model = TPLlama(spec)
        inputs = model.example_input(rows)
        with torch.no_grad():
            reference = model(inputs)
        backend = fxsp.backend(None, min_tokens=0, async_tp=True)
        with mocked_symmetric_memory(), torch.no_grad():
            result = torch.compile(model, backend=backend)(inputs)
        out.append((spec, rows, (result - reference).abs().max().item(), totals(backend.reports)))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_fused_graph_equals_eager(world):
    cases = [(Spec(), 2 * world + 1), (Spec(batched=True), 2 * world + 2), (Spec(), 64)]
    for rank, results in enumerate(run_world(world, fused_equals_eager, cases)):
        for spec, rows, error, (fusable, fused) in results:
            assert error <= 2e-4, (rank, rows, spec)
            assert fusable == fused == 8, (rank, rows, spec)
