"""`inner="eager"` sees the graph Inductor's post-grad pass sees: Inductor's joint-graph
clean-ups (a clone left by eval-mode dropout, an identity view) run before fxsp either way, so
the report counts do not depend on the inner compiler."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

import fxsp
from fxsp.testing.tp_llama import Spec, TPLlama


class DropoutBlock(nn.Module):
    """Phi3-style: the all-reduce of each sublayer goes through dropout (an identity in eval
    mode, a clone in ATen) before the residual add and the norm; `between` picks what stands
    there."""

    def __init__(self, between: str, layers: int = 2, hidden: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.ParameterList(
            nn.Parameter(torch.randn(hidden, hidden)) for _ in range(layers + 1)
        )
        self.norm_w = nn.ParameterList(nn.Parameter(torch.randn(hidden)) for _ in range(layers + 1))
        self.dropout = nn.Dropout(0.1)
        self.between = between

    def norm(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.norm_w[i] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def stand_between(self, x: torch.Tensor) -> torch.Tensor:
        if self.between == "dropout":
            return self.dropout(x)
        if self.between == "clone":
            return x.clone()
        return x.view(x.shape)  # "view": an identity view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stand_between(funcol.all_reduce(x @ self.w[0], "sum", dist.group.WORLD))
        out, residual = self.norm(0, h), h
        for i in range(1, len(self.w)):
            residual = (
                self.stand_between(funcol.all_reduce(out @ self.w[i], "sum", dist.group.WORLD))
                + residual
            )
            out = self.norm(i, residual)
        return out


def sp_counts(model: nn.Module, x: torch.Tensor, inner: str) -> dict:
    torch._dynamo.reset()
    backend = fxsp.backend(None, inner=inner)
    with torch.no_grad():  # the compile cache on, as users have it (the conftest's dir is fresh)
        torch.compile(model, backend=backend)(x)
    counts: dict = {}
    for report in backend.reports:
        for rule, n in report.counts.items():
            counts[rule] = counts.get(rule, 0) + n
    return {rule: n for rule, n in counts.items() if n}


@pytest.mark.parametrize("between", ["dropout", "clone", "view"])
def test_counts_do_not_depend_on_the_inner_compiler(fake_pg, between):
    model = DropoutBlock(between).eval()
    x = torch.randn(6, 8)
    eager, inductor = sp_counts(model, x, "eager"), sp_counts(model, x, "inductor")
    assert eager == inductor
    assert (eager["sp.first"], eager["sp.middle"], eager["sp.last"]) == (1, 1, 1)  # every site


@pytest.mark.parametrize("batched", [False, True])
def test_tp_llama_counts_do_not_depend_on_the_inner_compiler(fake_pg, batched):
    model = TPLlama(Spec(batched=batched))
    x = model.example_input(6)
    eager, inductor = sp_counts(model, x, "eager"), sp_counts(model, x, "inductor")
    assert eager == inductor
    assert eager["sp.first"] == 1
