"""SP through row-wise ops between the all-reduce and the norm (or its residual add).

Granite's multipliers, Gemma's √H embedding scale, MoE's reshape of the experts' [T, H]
all-reduce to [1, T, H], a clone: each acts on each row alone, so the shard passes through it.
Ops that mix rows (cumsum or softmax over tokens, a mean over the token dim, a matmul
contracting over tokens) are never crossed, and the near-miss names them.
Golden graphs on the fake process group; numerics on gloo worlds of 2 and 3 ranks.
"""

from __future__ import annotations

import expecttest
import pytest
import torch
import torch.distributed as dist
from torch import nn

import fxsp
from tests.support import RowwiseStack, compile_reports, last_op
from tests.worlds import run_world


def rewrite(
    model: nn.Module, x: torch.Tensor, inner: str = "eager"
) -> fxsp.compile.report.GraphReport:
    (report,) = compile_reports(model, x, inner=inner)
    return report


def sp_counts(report) -> dict:
    return {k: v for k, v in report.counts.items() if k.startswith("sp.") and v}


@pytest.fixture
def world(fake_pg):
    return fake_pg


@pytest.mark.usefixtures("world")
class TestGoldenRowwise(expecttest.TestCase):
    def test_granite_multipliers(self):
        """The embedding multiplier and the residual multiplier run on the shard."""
        report = rewrite(RowwiseStack("granite", "granite", layers=1), torch.randn(5, 8))
        self.assertEqual(sp_counts(report), {"sp.first": 1, "sp.last": 1})
        self.assertExpectedInline(
            report.rewritten,
            """\
%0 = input('arg0_1')  : f32[8, 8]
%1 = input('arg1_1')  : f32[5, 8]
%2 = input('arg2_1')  : f32[8]
%3 = input('arg3_1')  : f32[8, 8]
%4 = input('arg4_1')  : f32[8]
%5 = aten.constant_pad_nd.default(%1, [0, 0, 0, 1], 0.0)  : f32[6, 8]
%6 = aten.mm.default(%5, %0)  : f32[6, 8]
%7 = _c10d_functional.reduce_scatter_tensor.default(%6, 'sum', 2, G0)  : f32[3, 8]
%8 = _c10d_functional.wait_tensor.default(%7)  : f32[3, 8]
%9 = aten.mul.Tensor(%8, 12.0)  : f32[3, 8]
%10 = fxsp.rms_norm.default(%9, %2, 1e-06)  : f32[3, 8]
%11 = _c10d_functional.all_gather_into_tensor.default(%10, 2, G0)  : f32[6, 8]
%12 = _c10d_functional.wait_tensor.default(%11)  : f32[6, 8]
%13 = aten.mm.default(%12, %3)  : f32[6, 8]
%14 = _c10d_functional.reduce_scatter_tensor.default(%13, 'sum', 2, G0)  : f32[3, 8]
%15 = _c10d_functional.wait_tensor.default(%14)  : f32[3, 8]
%16 = aten.mul.Tensor(%15, 0.22)  : f32[3, 8]
%17 = fxsp.fused_add_rms_norm.default(%16, %9, %4, 1e-06)  : (f32[3, 8], f32[3, 8])
%18 = operator.getitem(%17, 0)  : f32[3, 8]
%19 = _c10d_functional.all_gather_into_tensor.default(%18, 2, G0)  : f32[6, 8]
%20 = _c10d_functional.wait_tensor.default(%19)  : f32[6, 8]
%21 = aten.slice.Tensor(%20, 0, 0, 5)  : f32[5, 8]
return (%21,)""",
        )

    def test_gemma_embedding_scale(self):
        """The scaled value is the first norm's input and the residual: the residual takes the
        scaled shard."""
        report = rewrite(RowwiseStack("gemma", layers=1), torch.randn(5, 8))
        self.assertEqual(sp_counts(report), {"sp.first": 1, "sp.last": 1})
        self.assertExpectedInline(
            report.rewritten,
            """\
%0 = input('arg0_1')  : f32[8, 8]
%1 = input('arg1_1')  : f32[5, 8]
%2 = input('arg2_1')  : f32[8]
%3 = input('arg3_1')  : f32[8, 8]
%4 = input('arg4_1')  : f32[8]
%5 = aten.constant_pad_nd.default(%1, [0, 0, 0, 1], 0.0)  : f32[6, 8]
%6 = aten.mm.default(%5, %0)  : f32[6, 8]
%7 = _c10d_functional.reduce_scatter_tensor.default(%6, 'sum', 2, G0)  : f32[3, 8]
%8 = _c10d_functional.wait_tensor.default(%7)  : f32[3, 8]
%9 = aten.full.default([], 2.8284270763397217, dtype=torch.float32)  : f32[]
%10 = aten.mul.Tensor(%8, %9)  : f32[3, 8]
%11 = fxsp.rms_norm.default(%10, %2, 1e-06)  : f32[3, 8]
%12 = _c10d_functional.all_gather_into_tensor.default(%11, 2, G0)  : f32[6, 8]
%13 = _c10d_functional.wait_tensor.default(%12)  : f32[6, 8]
%14 = aten.mm.default(%13, %3)  : f32[6, 8]
%15 = _c10d_functional.reduce_scatter_tensor.default(%14, 'sum', 2, G0)  : f32[3, 8]
%16 = _c10d_functional.wait_tensor.default(%15)  : f32[3, 8]
%17 = fxsp.fused_add_rms_norm.default(%16, %10, %4, 1e-06)  : (f32[3, 8], f32[3, 8])
%18 = operator.getitem(%17, 0)  : f32[3, 8]
%19 = _c10d_functional.all_gather_into_tensor.default(%18, 2, G0)  : f32[6, 8]
%20 = _c10d_functional.wait_tensor.default(%19)  : f32[6, 8]
%21 = aten.slice.Tensor(%20, 0, 0, 5)  : f32[5, 8]
return (%21,)""",
        )

    def test_moe_reshape_to_batch(self):
        """The experts' all-reduce on [T, H] viewed as [1, T, H]: the identity on the shard."""
        report = rewrite(RowwiseStack(between="moe", layers=1), torch.randn(1, 5, 8))
        self.assertEqual(sp_counts(report), {"sp.first": 1, "sp.last": 1})
        self.assertExpectedInline(
            report.rewritten,
            """\
%0 = input('arg0_1')  : f32[8, 8]
%1 = input('arg1_1')  : f32[1, 5, 8]
%2 = input('arg2_1')  : f32[8]
%3 = input('arg3_1')  : f32[8, 8]
%4 = input('arg4_1')  : f32[8]
%5 = aten.view.default(%1, [5, 8])  : f32[5, 8]
%6 = aten.constant_pad_nd.default(%5, [0, 0, 0, 1], 0.0)  : f32[6, 8]
%7 = aten.mm.default(%6, %0)  : f32[6, 8]
%8 = _c10d_functional.reduce_scatter_tensor.default(%7, 'sum', 2, G0)  : f32[3, 8]
%9 = _c10d_functional.wait_tensor.default(%8)  : f32[3, 8]
%10 = fxsp.rms_norm.default(%9, %2, 1e-06)  : f32[3, 8]
%11 = _c10d_functional.all_gather_into_tensor.default(%10, 2, G0)  : f32[6, 8]
%12 = _c10d_functional.wait_tensor.default(%11)  : f32[6, 8]
%13 = aten.mm.default(%12, %3)  : f32[6, 8]
%14 = _c10d_functional.reduce_scatter_tensor.default(%13, 'sum', 2, G0)  : f32[3, 8]
%15 = _c10d_functional.wait_tensor.default(%14)  : f32[3, 8]
%16 = fxsp.fused_add_rms_norm.default(%15, %9, %4, 1e-06)  : (f32[3, 8], f32[3, 8])
%17 = operator.getitem(%16, 0)  : f32[3, 8]
%18 = _c10d_functional.all_gather_into_tensor.default(%17, 2, G0)  : f32[6, 8]
%19 = _c10d_functional.wait_tensor.default(%18)  : f32[6, 8]
%20 = aten.slice.Tensor(%19, 0, 0, 5)  : f32[5, 8]
%21 = aten.view.default(%20, [1, 5, 8])  : f32[1, 5, 8]
return (%21,)""",
        )

    def test_clone(self):
        """Eval-mode dropout's clone, where no joint-graph pass removed it (make_fx here)."""
        from torch.fx.experimental.proxy_tensor import make_fx

        from fxsp.compile.passes import run_passes
        from fxsp.sp.rules import SPConfig

        model = RowwiseStack(between="clone", layers=1)
        params = dict(model.named_parameters())

        def forward(x, params):
            return torch.func.functional_call(model, params, (x,))

        with torch.no_grad():
            gm = make_fx(forward, tracing_mode="fake")(torch.randn(5, 8), params)
        assert any(n.target is torch.ops.aten.clone.default for n in gm.graph.nodes)
        report = run_passes(gm.graph, SPConfig(dist.group.WORLD.group_name, 2, 0))
        self.assertEqual(sp_counts(report), {"sp.first": 1, "sp.last": 1})
        self.assertExpectedInline(
            report.rewritten,
            """\
%0 = input('x_1')  : f32[5, 8]
%1 = input('params_1')  : f32[5, 5]
%2 = input('params_2')  : f32[8, 8]
%3 = input('params_3')  : f32[8, 8]
%4 = input('params_4')  : f32[8]
%5 = input('params_5')  : f32[8]
%6 = aten.constant_pad_nd.default(%0, [0, 0, 0, 1], 0.0)  : f32[6, 8]
%7 = aten.mm.default(%6, %2)  : f32[6, 8]
%8 = _c10d_functional.reduce_scatter_tensor.default(%7, 'sum', 2, G0)  : f32[3, 8]
%9 = _c10d_functional.wait_tensor.default(%8)  : f32[3, 8]
%10 = fxsp.rms_norm.default(%9, %4, 1e-06)  : f32[3, 8]
%11 = _c10d_functional.all_gather_into_tensor.default(%10, 2, G0)  : f32[6, 8]
%12 = _c10d_functional.wait_tensor.default(%11)  : f32[6, 8]
%13 = aten.mm.default(%12, %3)  : f32[6, 8]
%14 = _c10d_functional.reduce_scatter_tensor.default(%13, 'sum', 2, G0)  : f32[3, 8]
%15 = _c10d_functional.wait_tensor.default(%14)  : f32[3, 8]
%16 = aten.clone.default(%15)  : f32[3, 8]
%17 = fxsp.fused_add_rms_norm.default(%16, %9, %5, 1e-06)  : (f32[3, 8], f32[3, 8])
%18 = operator.getitem(%17, 0)  : f32[3, 8]
%19 = _c10d_functional.all_gather_into_tensor.default(%18, 2, G0)  : f32[6, 8]
%20 = _c10d_functional.wait_tensor.default(%19)  : f32[6, 8]
%21 = aten.slice.Tensor(%20, 0, 0, 5)  : f32[5, 8]
return [%21]""",
        )


# op between the all-reduce and the add: the op the near-miss must name
ROW_MIXING = {
    "cumsum": "aten.cumsum.default",
    "softmax": "aten.sum.dim_IntList",  # decomposed: exp(y - max) / sum, the sum over tokens
    "token_mean": "aten.mean.dim",
    "token_mm": "aten.mm.default",
}


@pytest.mark.parametrize("between", ROW_MIXING)
def test_row_mixing_ops_are_not_crossed(world, between):
    """The residual is the graph input, so the add's all-reduce is the only candidate."""
    report = rewrite(RowwiseStack("input", between, layers=1), torch.randn(5, 8))
    assert sp_counts(report) == {}, report.explain()
    near = str(report.misses["sp.last"])
    assert ROW_MIXING[between] in near and ("mix" in near or "all rows into one" in near), near


def test_inner_compilers_count_the_same(world):
    for embed, between, x in [
        ("granite", "granite", torch.randn(5, 8)),
        ("gemma", None, torch.randn(5, 8)),
        (None, "moe", torch.randn(1, 5, 8)),
    ]:
        counts = {
            inner: sp_counts(rewrite(RowwiseStack(embed, between), x, inner))
            for inner in ("eager", "inductor")
        }
        torch._dynamo.reset()
        assert (
            counts["eager"] == counts["inductor"] == {"sp.first": 1, "sp.middle": 1, "sp.last": 1}
        ), counts


# --- numerics on gloo -------------------------------------------------------------------------

CASES = [("granite", "granite"), ("gemma", None), (None, "moe"), ("gemma", "granite")]


def compare(rank: int, world: int, rows_list: list) -> list:
    """For each case, rows count and inner compiler: max |compiled - eager| and the SP counts."""
    out = []
    for embed, between in CASES:
        for inner in ("eager", "inductor"):
            for rows in rows_list:
                torch._dynamo.reset()
                model = RowwiseStack(embed, between, tokens=rows)
                x = torch.randn(1, rows, 8) if between == "moe" else torch.randn(rows, 8)
                backend = fxsp.backend(None, inner=inner)
                with torch.no_grad():
                    reference, result = model(x), torch.compile(model, backend=backend)(x)
                counts = {
                    k: v
                    for r in backend.reports
                    for k, v in r.counts.items()
                    if k.startswith("sp.") and v
                }
                out.append(
                    ((embed, between, inner, rows), (result - reference).abs().max().item(), counts)
                )
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_rowwise_models_equal_eager(world_size):
    rows = [2 * world_size + 1, 1]
    for rank, results in enumerate(run_world(world_size, compare, rows)):
        for case, error, counts in results:
            assert error <= 2e-4, (rank, case, error)
            assert counts == {"sp.first": 1, "sp.middle": 1, "sp.last": 1}, (rank, case, counts)


# --- rowwise.row_input: the input a node passes rows on from, or why not ----------------------


def test_row_input_follows_the_rows_operand():
    from fxsp.sp.rowwise import row_input

    passes = {
        "scalar multiplier": (lambda x: x * 0.22, [(5, 8)]),
        "scale tensor first": (lambda x: torch.tensor(2.0) * x, [(5, 8)]),
        "to [1, T, H]": (lambda x: x.view(1, 5, 8), [(5, 8)]),
        "cast": (lambda x: x.to(torch.bfloat16), [(5, 8)]),
        "per-feature weight": (lambda x, w: w * x, [(5, 8), (8,)]),
    }
    for name, (fn, shapes) in passes.items():
        node, inputs = last_op(fn, *shapes)
        assert row_input(node) is inputs[0], name
    refused = {
        "mean over tokens": (lambda x: x - x.mean(0, keepdim=True), [(5, 8)], "aten.mean.dim"),
        "cumsum over tokens": (lambda x: x.cumsum(0), [(5, 8)], "across the token dims"),
        "mean over hidden": (
            lambda x: x.mean(-1, keepdim=True),
            [(5, 8)],
            "not rows of the same size",
        ),
        "rows of its own": (lambda x, y: x + y, [(5, 8), (5, 8)], "has rows of its own"),
    }
    for name, (fn, shapes, why) in refused.items():
        node, _ = last_op(fn, *shapes)
        verdict = row_input(node)
        assert isinstance(verdict, str) and why in verdict, (name, verdict)
