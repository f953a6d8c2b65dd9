"""Async TP: Inductor's micro-pipeline TP fuses every SP site, in every layout.

Single process, fake process group, NCCL and symmetric memory mocked (fxsp.testing.async_tp):
Inductor runs its real fusion pass over fxsp's graph, and `report.async_tp` counts what it
fused. Numerics of the fused graph on gloo: test_async_tp_numerics.py.
"""

from __future__ import annotations

import logging

import expecttest
import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

import fxsp
from fxsp.compile.stats import async_tp_sites
from fxsp.testing.async_tp import compile_for_coverage, totals
from fxsp.testing.tp_llama import RMSNorm, Spec, TPLlama
from fxsp.testing.tp_moe import MoESpec, TPMoE
from tests.support import RowwiseStack, dtensor_mlp

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


class MLPBlock(nn.Module):
    """residual → norm → column-parallel up → relu → row-parallel down → all-reduce, per layer."""

    def __init__(self, layers: int = 2, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norms = nn.ModuleList(RMSNorm(Spec(hidden=hidden)) for _ in range(layers + 1))
        self.up = nn.ParameterList(nn.Parameter(torch.randn(hidden, 8)) for _ in range(layers))
        self.down = nn.ParameterList(nn.Parameter(torch.randn(8, hidden)) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for norm, up, down in zip(self.norms, self.up, self.down):
            residual = residual + funcol.all_reduce(
                torch.relu(norm(residual) @ up) @ down, "sum", dist.group.WORLD
            )
        return self.norms[-1](residual)


class OneMatmulBlock(nn.Module):
    """all_reduce → norm → one row-parallel matmul → all_reduce: SP makes the chain
    all_gather → mm → reduce_scatter, on which Inductor's own micro-pipeline TP fails."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.ParameterList(nn.Parameter(torch.randn(hidden, hidden)) for _ in range(2))
        self.norms = nn.ModuleList(RMSNorm(Spec(hidden=hidden)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = funcol.all_reduce(x @ self.w[0], "sum", dist.group.WORLD)
        h = funcol.all_reduce(self.norms[0](h) @ self.w[1], "sum", dist.group.WORLD) + h
        return self.norms[1](h)


@pytest.fixture(autouse=True)
def world(fake_pg):
    return fake_pg


def _llama(rows: int, **spec) -> tuple:
    model = TPLlama(Spec(**spec))
    return model, model.example_input(rows)


def _scaled_mm_llama(rows: int) -> tuple:
    return _llama(rows, fp8=True, scaled_mm=True, hidden=64, heads=4, inter=64)  # sizes % 16


def _moe(rows: int) -> tuple:
    model = TPMoE(MoESpec())
    return model, model.example_input(rows)


def _dtensor_mlp(rows: int) -> tuple:
    model, _ = dtensor_mlp()
    return model, torch.randn(rows, 16)


# (name, build, rows, dynamic, fusable): per layer TPLlama has four sites (all-gather → qkv,
# o → reduce-scatter, all-gather → gate/up, down → reduce-scatter); the MoE's routed experts
# have none (no matmul next to their collectives), its attention four. With a graph break the
# first graph stays plain TP (its last residual leaves it in full: SP would send more bytes), so
# only the second graph's sites are fusable. The DTensor block's input is replicated, so its
# first norm feeds its matmul without an all-gather: three sites. Every fusable site is fused.
TABLE = [
    ("[T, H] divisible", _llama, 64, False, 8),
    ("[T, H] padded", _llama, 37, False, 8),
    ("[T, H] one row", _llama, 1, False, 8),
    ("[B, S, H]", lambda rows: _llama(rows, batched=True), 64, False, 8),
    ("[B, S, H] padded", lambda rows: _llama(rows, batched=True), 37, False, 8),
    ("symbolic rows", _llama, 37, True, 8),
    ("symbolic [B, S, H]", lambda rows: _llama(rows, batched=True), 38, True, 8),
    ("FP8 scaled mm", _scaled_mm_llama, 64, False, 8),
    ("FP8 scaled mm padded", _scaled_mm_llama, 37, False, 8),
    ("graph break", lambda rows: _llama(rows, graph_break=True), 37, False, 3),
    ("MoE", _moe, 37, False, 4),
    ("DTensor parallelize_module", _dtensor_mlp, 37, False, 3),
    # x @ w0 → reduce-scatter, all-gather → @ w1; the reduce-scatter after w1 then follows a
    # fused all-gather + matmul: one matmul fuses with one collective.
    (
        "all_gather → mm → reduce_scatter",
        lambda rows: (OneMatmulBlock(), torch.randn(rows, 16)),
        5,
        False,
        2,
    ),
    # Row-wise ops between the reduce-scatter and the norm (tests/test_sp_rowwise.py): a Granite
    # multiplier and a reshape to [1, T, H] run on the shard, after the fused reduce-scatter.
    (
        "Granite multipliers",
        lambda rows: (RowwiseStack("granite", "granite", tokens=rows), torch.randn(rows, 8)),
        37,
        False,
        3,
    ),
    (
        "MoE reshape to [1, T, H]",
        lambda rows: (RowwiseStack(None, "moe", tokens=rows), torch.randn(1, rows, 8)),
        37,
        False,
        3,
    ),
]


@pytest.mark.parametrize(
    "name, build, rows, dynamic, fusable", TABLE, ids=[row[0] for row in TABLE]
)
def test_every_fusable_site_is_fused(name, build, rows, dynamic, fusable):
    model, inputs = build(rows)
    mesh = getattr(next(model.parameters()), "device_mesh", None)
    reports = compile_for_coverage(model, inputs, dynamic=dynamic, tp_group=mesh)
    assert all(r.async_tp is not None for r in reports)
    blocked = [why for r in reports for why in r.async_tp.blocked]
    assert totals(reports) == (fusable, fusable), blocked


@pytest.mark.parametrize("tokens", [8, 7])
def test_a_hand_written_sp_plan_fuses_too(world, tokens):
    """torchtitan's SP plan written by hand: DTensor's collectives on the sequence dim, nothing
    left for fxsp's rewrite; fxsp.training.fusable_layout lays them out for the fusion. 2
    layers: the embedding's and 4 layers' reduce-scatters, 4 all-gathers (the head's among
    them); 7 tokens a sequence: uneven shards."""
    from torch.distributed.device_mesh import init_device_mesh

    from fxsp.testing.hf import parallelize_sp_by_hand, tiny_model

    if tokens % world and torch.__version__ < "2.13":
        pytest.skip(
            "torch 2.11's Dynamo fails on this plan's uneven shards itself (a view of DTensor's "
            "padded sequence in its fake-tensor run)"
        )
    mesh = init_device_mesh("cpu", (world,))
    model = parallelize_sp_by_hand(tiny_model("llama"), mesh)
    ids = torch.randint(3, 128, (2, tokens), generator=torch.Generator().manual_seed(7))
    reports = compile_for_coverage(model, ids, tp_group=mesh)
    blocked = [why for r in reports for why in r.async_tp.blocked]
    assert totals(reports) == (9, 9), blocked


class TestGoldenAsyncTP(expecttest.TestCase):
    """The layout micro-pipeline TP needs: nothing between a collective and its matmul."""

    def test_padded_rows_meet_their_matmuls(self):
        (report,) = compile_for_coverage(MLPBlock(layers=2), torch.randn(5, 16))
        self.assertEqual(str(report.async_tp), "async TP: 3 of 3 fusable sites fused")
        self.assertExpectedInline(
            report.rewritten,
            """\
%0 = input('arg0_1')  : f32[16, 8]
%1 = input('arg1_1')  : f32[8, 16]
%2 = input('arg2_1')  : f32[5, 16]
%3 = input('arg3_1')  : f32[16]
%4 = input('arg4_1')  : f32[16, 8]
%5 = input('arg5_1')  : f32[8, 16]
%6 = input('arg6_1')  : f32[16]
%7 = input('arg7_1')  : f32[16]
%8 = aten.constant_pad_nd.default(%2, [0, 0, 0, 1], 0.0)  : f32[6, 16]
%9 = aten.slice.Tensor(%8, 0, 0, 3)  : f32[3, 16]
%10 = fxsp.rms_norm.default(%2, %3, 1e-06)  : f32[5, 16]
%11 = aten.mm.default(%10, %0)  : f32[5, 8]
%12 = aten.relu.default(%11)  : f32[5, 8]
%13 = aten.constant_pad_nd.default(%12, [0, 0, 0, 1], 0.0)  : f32[6, 8]
%14 = aten.mm.default(%13, %1)  : f32[6, 16]
%15 = _c10d_functional.reduce_scatter_tensor.default(%14, 'sum', 2, G0)  : f32[3, 16]
%16 = _c10d_functional.wait_tensor.default(%15)  : f32[3, 16]
%17 = fxsp.fused_add_rms_norm.default(%16, %9, %6, 1e-06)  : (f32[3, 16], f32[3, 16])
%18 = operator.getitem(%17, 0)  : f32[3, 16]
%19 = operator.getitem(%17, 1)  : f32[3, 16]
%20 = _c10d_functional.all_gather_into_tensor.default(%18, 2, G0)  : f32[6, 16]
%21 = _c10d_functional.wait_tensor.default(%20)  : f32[6, 16]
%22 = aten.mm.default(%21, %4)  : f32[6, 8]
%23 = aten.slice.Tensor(%22, 0, 0, 5)  : f32[5, 8]
%24 = aten.relu.default(%23)  : f32[5, 8]
%25 = aten.constant_pad_nd.default(%24, [0, 0, 0, 1], 0.0)  : f32[6, 8]
%26 = aten.mm.default(%25, %5)  : f32[6, 16]
%27 = _c10d_functional.reduce_scatter_tensor.default(%26, 'sum', 2, G0)  : f32[3, 16]
%28 = _c10d_functional.wait_tensor.default(%27)  : f32[3, 16]
%29 = fxsp.fused_add_rms_norm.default(%28, %19, %7, 1e-06)  : (f32[3, 16], f32[3, 16])
%30 = operator.getitem(%29, 0)  : f32[3, 16]
%31 = _c10d_functional.all_gather_into_tensor.default(%30, 2, G0)  : f32[6, 16]
%32 = _c10d_functional.wait_tensor.default(%31)  : f32[6, 16]
%33 = aten.slice.Tensor(%32, 0, 0, 5)  : f32[5, 16]
return (%33,)""",
        )

    def test_batch_seq_hidden_gathers_rows_into_the_matmul(self):
        (report,) = compile_for_coverage(MLPBlock(layers=2), torch.randn(1, 5, 16))
        self.assertEqual(str(report.async_tp), "async TP: 3 of 3 fusable sites fused")
        self.assertExpectedInline(
            report.rewritten,
            """\
%0 = input('arg0_1')  : f32[16, 8]
%1 = input('arg1_1')  : f32[8, 16]
%2 = input('arg2_1')  : f32[1, 5, 16]
%3 = input('arg3_1')  : f32[16]
%4 = input('arg4_1')  : f32[16, 8]
%5 = input('arg5_1')  : f32[8, 16]
%6 = input('arg6_1')  : f32[16]
%7 = input('arg7_1')  : f32[16]
%8 = aten.view.default(%2, [5, 16])  : f32[5, 16]
%9 = aten.constant_pad_nd.default(%8, [0, 0, 0, 1], 0.0)  : f32[6, 16]
%10 = aten.slice.Tensor(%9, 0, 0, 3)  : f32[3, 16]
%11 = fxsp.rms_norm.default(%2, %3, 1e-06)  : f32[1, 5, 16]
%12 = aten.reshape.default(%11, [5, 16])  : f32[5, 16]
%13 = aten.mm.default(%12, %0)  : f32[5, 8]
%14 = aten.reshape.default(%13, [1, 5, 8])  : f32[1, 5, 8]
%15 = aten.relu.default(%14)  : f32[1, 5, 8]
%16 = aten.reshape.default(%15, [5, 8])  : f32[5, 8]
%17 = aten.constant_pad_nd.default(%16, [0, 0, 0, 1], 0.0)  : f32[6, 8]
%18 = aten.mm.default(%17, %1)  : f32[6, 16]
%19 = _c10d_functional.reduce_scatter_tensor.default(%18, 'sum', 2, G0)  : f32[3, 16]
%20 = _c10d_functional.wait_tensor.default(%19)  : f32[3, 16]
%21 = fxsp.fused_add_rms_norm.default(%20, %10, %6, 1e-06)  : (f32[3, 16], f32[3, 16])
%22 = operator.getitem(%21, 0)  : f32[3, 16]
%23 = operator.getitem(%21, 1)  : f32[3, 16]
%24 = _c10d_functional.all_gather_into_tensor.default(%22, 2, G0)  : f32[6, 16]
%25 = _c10d_functional.wait_tensor.default(%24)  : f32[6, 16]
%26 = aten.mm.default(%25, %4)  : f32[6, 8]
%27 = aten.slice.Tensor(%26, 0, 0, 5)  : f32[5, 8]
%28 = aten.reshape.default(%27, [1, 5, 8])  : f32[1, 5, 8]
%29 = aten.relu.default(%28)  : f32[1, 5, 8]
%30 = aten.reshape.default(%29, [5, 8])  : f32[5, 8]
%31 = aten.constant_pad_nd.default(%30, [0, 0, 0, 1], 0.0)  : f32[6, 8]
%32 = aten.mm.default(%31, %5)  : f32[6, 16]
%33 = _c10d_functional.reduce_scatter_tensor.default(%32, 'sum', 2, G0)  : f32[3, 16]
%34 = _c10d_functional.wait_tensor.default(%33)  : f32[3, 16]
%35 = fxsp.fused_add_rms_norm.default(%34, %23, %7, 1e-06)  : (f32[3, 16], f32[3, 16])
%36 = operator.getitem(%35, 0)  : f32[3, 16]
%37 = _c10d_functional.all_gather_into_tensor.default(%36, 2, G0)  : f32[6, 16]
%38 = _c10d_functional.wait_tensor.default(%37)  : f32[6, 16]
%39 = aten.slice.Tensor(%38, 0, 0, 5)  : f32[5, 16]
%40 = aten.view.default(%39, [1, 5, 16])  : f32[1, 5, 16]
return (%40,)""",
        )


def test_explain_names_the_node_between_a_collective_and_its_matmul():
    """The layout before issue 11: a trim after the all-gather, a pad before the reduce-scatter."""
    graph = torch.fx.Graph()
    shard, w = graph.placeholder("shard"), graph.placeholder("w")
    gathered = graph.call_function(
        c10d.wait_tensor.default,
        (graph.call_function(c10d.all_gather_into_tensor.default, (shard, 2, "0")),),
    )
    trimmed = graph.call_function(aten.slice.Tensor, (gathered, 0, 0, 5))
    product = graph.call_function(aten.mm.default, (trimmed, w))
    padded = graph.call_function(aten.constant_pad_nd.default, (product, [0, 0, 0, 1], 0.0))
    scattered = graph.call_function(
        c10d.wait_tensor.default,
        (graph.call_function(c10d.reduce_scatter_tensor.default, (padded, "sum", 2, "0")),),
    )
    graph.output(scattered)
    sites = async_tp_sites(graph)
    assert (sites.fusable, sites.fused) == (2, 0)
    assert sites.blocked == [
        f"all_gather {gathered.args[0].name} → {product.name}: "
        f"aten.slice.Tensor {trimmed.name} sits between",
        f"{product.name} → reduce_scatter {scattered.args[0].name}: "
        f"aten.constant_pad_nd.default {padded.name} sits between",
    ]


def test_report_and_explain_say_what_was_fused():
    (report,) = compile_for_coverage(MLPBlock(layers=2), torch.randn(5, 16))
    assert "async TP: 3 of 3 fusable sites fused" in report.explain()
    assert "not fused" not in report.explain()


def test_without_symmetric_memory_it_says_so_once_and_compiles_without(caplog):
    """No NCCL here (a CPU build has none; a CUDA build has it, but the group is the fake
    one): one line, then SP as usual, and no fusion attempted."""
    backend = fxsp.backend(None, min_tokens=0, async_tp=True)
    compiled = torch.compile(MLPBlock(layers=1), backend=backend)
    with caplog.at_level(logging.WARNING, logger="fxsp"), torch.no_grad():
        compiled(torch.randn(5, 16))
        torch._dynamo.reset()
        torch.compile(MLPBlock(layers=1), backend=backend)(torch.randn(5, 16))
    lines = [r.getMessage() for r in caplog.records if "async_tp" in r.getMessage()]
    why = (
        "the TP group's backend is fake, not NCCL"
        if dist.is_nccl_available()
        else "this torch build has no NCCL"
    )
    assert lines == [f"fxsp: async_tp off, compiling without micro-pipeline TP: {why}"]
    assert all(r.async_tp is None for r in backend.reports)
    assert backend.reports[-1].counts["sp.last"] == 1
    assert "symm_mem" not in backend.reports[-1].after


def test_symmetric_memory_off_for_the_group_is_named():
    """NCCL but no symmetric memory for this group: every site direct, none fused, each said."""
    from torch.distributed._symmetric_memory import _test_mode

    import fxsp.compile.async_tp

    backend = fxsp.backend(None, min_tokens=0, async_tp=True)
    with _test_mode({"another group"}), torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(dist, "is_nccl_available", lambda: True)
        # As if enabling had worked, while the fusion finds symmetric memory off for the group.
        patch.setattr(fxsp.compile.async_tp, "enable_async_tp", lambda group: None)
        torch.compile(MLPBlock(layers=2), backend=backend)(torch.randn(5, 16))
    sites = backend.reports[-1].async_tp
    assert (sites.fusable, sites.fused) == (3, 0)
    assert all("direct, but not fused" in why for why in sites.blocked), sites.blocked
