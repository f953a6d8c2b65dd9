"""What a graph moves (fxsp/compile/stats.py) and how collectives are read
(fxsp/ir/collectives.py), for
both collective flavours: PyTorch's functional collectives and vLLM's ops (CPU stand-ins)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

import fxsp
from fxsp.ir.collectives import check_flavor, kind
from tests.vllm_standins import register_vllm_standins

register_vllm_standins()

c10d = torch.ops._c10d_functional
vllm = torch.ops.vllm


class Layers(nn.Module):
    """all_reduce → norm, then per layer all_reduce(matmul) + residual → norm, with the
    all-reduces of one flavour."""

    def __init__(self, flavor: str, layers: int = 2, hidden: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.flavor = flavor
        self.w = nn.ParameterList(
            nn.Parameter(torch.randn(hidden, hidden)) for _ in range(layers + 1)
        )
        self.norm_w = nn.ParameterList(nn.Parameter(torch.randn(hidden)) for _ in range(layers + 1))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.flavor == "vllm":
            return vllm.all_reduce(x, dist.group.WORLD.group_name)
        return funcol.all_reduce(x, "sum", dist.group.WORLD)

    def norm(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.norm_w[i] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.all_reduce(x @ self.w[0])
        out = self.norm(0, residual)
        for i in range(1, len(self.w)):
            residual = self.all_reduce(out @ self.w[i]) + residual
            out = self.norm(i, residual)
        return out


@pytest.mark.parametrize("flavor", ["c10d", "vllm"])
def test_traffic_of_an_sp_graph_counts_the_new_collectives(fake_pg, flavor):
    rows, hidden = 6, 8
    backend = fxsp.backend(None, inner="eager")
    with torch.no_grad():
        torch.compile(Layers(flavor, hidden=hidden), backend=backend)(torch.randn(rows, hidden))
    (report,) = backend.reports
    assert [report.counts[f"sp.{rule}"] for rule in ("first", "middle", "last")] == [1, 1, 1]
    payload = rows * hidden * 4  # one f32 activation, the whole of it on every rank
    assert report.traffic_before.bytes == {"all_reduce": 3 * payload}
    # Each reduce-scatter takes a whole activation in; each all-gather hands one out.
    assert report.traffic_after.bytes == {"reduce_scatter": 3 * payload, "all_gather": 3 * payload}
    assert report.traffic_after.sites == report.traffic_before.sites == 3
    assert report.traffic_after.norm_rows == [rows // fake_pg] * 3
    ops = {
        "c10d": [
            "_c10d_functional.reduce_scatter_tensor.default",
            "_c10d_functional.all_gather_into_tensor.default",
        ],
        "vllm": ["vllm.reduce_scatter.default", "vllm.all_gather.default"],
    }[flavor]
    assert [op for op, _, group in report.collectives] == ops * 3
    assert {group for _, _, group in report.collectives} == {0}


def test_kind_reads_both_flavours():
    assert [
        kind(t)
        for t in (
            c10d.all_reduce.default,
            c10d.reduce_scatter_tensor.default,
            c10d.all_gather_into_tensor.default,
            c10d.wait_tensor.default,
        )
    ] == ["all_reduce", "reduce_scatter", "all_gather", "wait"]
    vllm_ops = (vllm.all_reduce.default, vllm.reduce_scatter.default, vllm.all_gather.default)
    assert [kind(t) for t in vllm_ops] == ["all_reduce", "reduce_scatter", "all_gather"]
    assert kind(c10d.all_to_all_single.default) == "other"
    assert kind(torch.ops.aten.add.Tensor) is None and kind(len) is None


def test_flavor_is_one_of_two():
    assert check_flavor("vllm") == "vllm"
    with pytest.raises(ValueError, match="unknown collective flavor 'nccl'"):
        check_flavor("nccl")
