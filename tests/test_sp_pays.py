"""SP never breaks a compile and never sends more than plain TP (issue 24's families).

- A `-1` view between the all-reduce and the residual add, with symbolic rows: the rows of the
  view are computed from the all-reduce's, never read off the view itself (a `sym_size` of the
  view kept the old all-reduce alive beside the reduce-scatter, and Inductor refused a node
  used before its definition).
- A residual needed in full outside the SP region (returned from the graph): the rewrite would
  send a reduce-scatter and two all-gathers against one all-reduce, so the site stays as it is,
  with a near-miss saying why; with `shard_outputs` the residual leaves sharded and SP pays.
Graphs on the fake process group; numerics on gloo worlds of 2 and 3 ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

import fxsp
from tests.worlds import run_world

H = 16


class ViewedAllReduce(nn.Module):
    """`all_reduce(x @ w).view(1, -1, H)`, then the residual add and an RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(H, H) / H**0.5, requires_grad=False)
        self.norm = nn.Parameter(torch.rand(H) + 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = funcol.all_reduce(x @ self.w, "sum", dist.group.WORLD).view(1, -1, H)
        return F.rms_norm(h + residual, (H,), self.norm, 1e-6) + 1


class ResidualReturned(nn.Module):
    """The residual after the add is returned as well as normalised."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(H, H) / H**0.5, requires_grad=False)
        self.norm = nn.Parameter(torch.rand(H) + 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple:
        h = funcol.all_reduce(x @ self.w, "sum", dist.group.WORLD) + residual
        return F.rms_norm(h, (H,), self.norm, 1e-6) @ self.w, h


def inputs(model: nn.Module, rows: int, dynamic: bool) -> tuple:
    torch.manual_seed(rows)
    x = torch.randn(rows, H)
    residual = (
        torch.randn(1, rows, H) if isinstance(model, ViewedAllReduce) else torch.randn(rows, H)
    )
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(residual, residual.dim() - 2)
    return x, residual


def compile_once(model: nn.Module, rows: int, dynamic: bool, **options) -> tuple:
    backend = fxsp.backend(None, min_tokens=0, **options)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*inputs(model, rows, dynamic))
    return out, backend.reports


def sp_sites(reports: list) -> int:
    return sum(
        n for r in reports for k, n in r.counts.items() if k.startswith("sp.") and "out" not in k
    )


def assert_never_more_bytes(reports: list, tp: int, rows: int) -> None:
    """What each rank sends is at most what plain TP sent, up to the padding rows a row count
    the TP size does not divide needs (the reduce-scatter splits equal blocks)."""
    padded = -(-rows // tp) * tp
    for report in reports:
        before, after = (t.sent_per_rank(tp) for t in (report.traffic_before, report.traffic_after))
        assert after * rows <= before * padded * (1 + 1e-9), report.explain()


@pytest.mark.parametrize("fake_pg", [2, 3], indirect=True)
@pytest.mark.parametrize("rows", [12, 13])
def test_a_minus_one_view_with_symbolic_rows_compiles_without_the_all_reduce(fake_pg, rows):
    _, reports = compile_once(ViewedAllReduce(), rows, dynamic=True)
    (report,) = reports
    assert sp_sites(reports) == 1, report.explain()
    assert "_c10d_functional.all_reduce" not in report.after
    assert report.after.count("reduce_scatter_tensor") == 1
    assert "sym_size.int(%" not in report.rewritten.split("view.default")[-1]  # no size of the view
    assert_never_more_bytes(reports, fake_pg, rows)


@pytest.mark.parametrize("fake_pg", [2, 3], indirect=True)
def test_a_residual_read_in_full_outside_keeps_the_all_reduce(fake_pg):
    _, reports = compile_once(ResidualReturned(), 12, dynamic=False)
    (report,) = reports
    assert sp_sites(reports) == 0
    assert report.after.count("_c10d_functional.all_reduce") == 1
    near = str(report.misses["sp.middle"])
    assert "SP would send more than the all-reduce: 2 all-gathers" in near, near
    assert "read by output" in near
    assert "collective payload: all_reduce 768 B before, all_reduce 768 B after" in report.explain()
    assert_never_more_bytes(reports, fake_pg, 12)


@pytest.mark.parametrize("fake_pg", [2, 3], indirect=True)
def test_a_residual_leaving_sharded_is_rewritten(fake_pg):
    _, reports = compile_once(ResidualReturned(), 12, dynamic=False, shard_outputs=True)
    (report,) = reports
    assert report.counts["sp.middle"] == 1 and report.counts["sp.sharded_outputs"] == 1
    assert_never_more_bytes(reports, fake_pg, 12)


def compare(rank: int, world: int) -> list:
    """max |compiled - eager| for each case, on this rank."""
    out = []
    for model, rows, dynamic in [
        (ViewedAllReduce(), 12, True),
        (ViewedAllReduce(), 13, True),
        (ResidualReturned(), 13, False),
    ]:
        args = inputs(model, rows, dynamic)
        with torch.no_grad():
            reference = model(*args)
            result, reports = compile_once(model, rows, dynamic)
        pairs = zip(reference, result) if isinstance(reference, tuple) else [(reference, result)]
        out.append(max((a - b).abs().max().item() for a, b in pairs))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_numerics_match_eager_on_gloo(world):
    for rank, errors in enumerate(run_world(world, compare)):
        assert max(errors) <= 1e-5, (rank, errors)


@pytest.mark.parametrize("fake_pg", [2, 3], indirect=True)
@pytest.mark.parametrize("rows", [12, 13])
def test_the_residual_stream_leaving_through_an_add_takes_its_shard(fake_pg, rows):
    """No final norm: the last all-reduce is added to the residual and returned. The add takes
    the residual's shard (`sp.end`) instead of an all-gather of it, so every site pays."""
    from fxsp.testing.tp_llama import Spec, TPLlama

    model = TPLlama(Spec(layers=2, final_norm=False))
    backend = fxsp.backend(None, min_tokens=0)
    with torch.no_grad():
        torch.compile(model, backend=backend)(model.example_input(rows))
    (report,) = backend.reports
    assert report.counts["sp.end"] == 1 and report.counts["sp.middle"] == 3, report.explain()
    assert "_c10d_functional.all_reduce" not in report.after
    assert report.after.count("all_gather_into_tensor") == report.after.count("reduce_scatter")
    assert_never_more_bytes(backend.reports, fake_pg, rows)
