"""Golden graphs of the SP rewrite, single process on the fake process group.

Each test compiles a small TP block with `fxsp.backend(inner="eager")` and pins the graph
after the rewrite and clean-up (IR ops not yet lowered): what the rules produced, readable.
"""

from __future__ import annotations

import expecttest
import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

import fxsp
from tests.support import Block, compile_reports


@pytest.fixture(autouse=True)
def world(fake_pg):
    return fake_pg


class TestGoldenSP(expecttest.TestCase):
    def test_two_layers_rows(self):
        (report,) = compile_reports(Block(), torch.randn(4, 8))
        self.assertEqual(report.counts["sp.first"], 1)
        self.assertExpectedInline(
            report.rewritten,
            """\
%0 = input('arg0_1')  : f32[8, 8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[8]
%3 = input('arg3_1')  : f32[8, 8]
%4 = input('arg4_1')  : f32[8]
%5 = input('arg5_1')  : f32[8, 8]
%6 = input('arg6_1')  : f32[8]
%7 = aten.mm.default(%1, %0)  : f32[4, 8]
%8 = _c10d_functional.reduce_scatter_tensor.default(%7, 'sum', 2, G0)  : f32[2, 8]
%9 = _c10d_functional.wait_tensor.default(%8)  : f32[2, 8]
%10 = fxsp.rms_norm.default(%9, %2, 1e-06)  : f32[2, 8]
%11 = _c10d_functional.all_gather_into_tensor.default(%10, 2, G0)  : f32[4, 8]
%12 = _c10d_functional.wait_tensor.default(%11)  : f32[4, 8]
%13 = aten.mm.default(%12, %3)  : f32[4, 8]
%14 = _c10d_functional.reduce_scatter_tensor.default(%13, 'sum', 2, G0)  : f32[2, 8]
%15 = _c10d_functional.wait_tensor.default(%14)  : f32[2, 8]
%16 = fxsp.fused_add_rms_norm.default(%15, %9, %4, 1e-06)  : (f32[2, 8], f32[2, 8])
%17 = operator.getitem(%16, 0)  : f32[2, 8]
%18 = operator.getitem(%16, 1)  : f32[2, 8]
%19 = _c10d_functional.all_gather_into_tensor.default(%17, 2, G0)  : f32[4, 8]
%20 = _c10d_functional.wait_tensor.default(%19)  : f32[4, 8]
%21 = aten.mm.default(%20, %5)  : f32[4, 8]
%22 = _c10d_functional.reduce_scatter_tensor.default(%21, 'sum', 2, G0)  : f32[2, 8]
%23 = _c10d_functional.wait_tensor.default(%22)  : f32[2, 8]
%24 = fxsp.fused_add_rms_norm.default(%23, %18, %6, 1e-06)  : (f32[2, 8], f32[2, 8])
%25 = operator.getitem(%24, 0)  : f32[2, 8]
%26 = _c10d_functional.all_gather_into_tensor.default(%25, 2, G0)  : f32[4, 8]
%27 = _c10d_functional.wait_tensor.default(%26)  : f32[4, 8]
return (%27,)""",
        )

    def test_rows_not_divisible_are_padded_and_trimmed(self):
        (report,) = compile_reports(Block(layers=1), torch.randn(5, 8))
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
%9 = fxsp.rms_norm.default(%8, %2, 1e-06)  : f32[3, 8]
%10 = _c10d_functional.all_gather_into_tensor.default(%9, 2, G0)  : f32[6, 8]
%11 = _c10d_functional.wait_tensor.default(%10)  : f32[6, 8]
%12 = aten.mm.default(%11, %3)  : f32[6, 8]
%13 = _c10d_functional.reduce_scatter_tensor.default(%12, 'sum', 2, G0)  : f32[3, 8]
%14 = _c10d_functional.wait_tensor.default(%13)  : f32[3, 8]
%15 = fxsp.fused_add_rms_norm.default(%14, %8, %4, 1e-06)  : (f32[3, 8], f32[3, 8])
%16 = operator.getitem(%15, 0)  : f32[3, 8]
%17 = _c10d_functional.all_gather_into_tensor.default(%16, 2, G0)  : f32[6, 8]
%18 = _c10d_functional.wait_tensor.default(%17)  : f32[6, 8]
%19 = aten.slice.Tensor(%18, 0, 0, 5)  : f32[5, 8]
return (%19,)""",
        )

    def test_batch_seq_hidden(self):
        (report,) = compile_reports(Block(layers=1), torch.randn(2, 3, 8))
        self.assertExpectedInline(
            report.rewritten,
            """\
%0 = input('arg0_1')  : f32[8, 8]
%1 = input('arg1_1')  : f32[2, 3, 8]
%2 = input('arg2_1')  : f32[8]
%3 = input('arg3_1')  : f32[8, 8]
%4 = input('arg4_1')  : f32[8]
%5 = aten.view.default(%1, [6, 8])  : f32[6, 8]
%6 = aten.mm.default(%5, %0)  : f32[6, 8]
%7 = _c10d_functional.reduce_scatter_tensor.default(%6, 'sum', 2, G0)  : f32[3, 8]
%8 = _c10d_functional.wait_tensor.default(%7)  : f32[3, 8]
%9 = fxsp.rms_norm.default(%8, %2, 1e-06)  : f32[3, 8]
%10 = _c10d_functional.all_gather_into_tensor.default(%9, 2, G0)  : f32[6, 8]
%11 = _c10d_functional.wait_tensor.default(%10)  : f32[6, 8]
%12 = aten.mm.default(%11, %3)  : f32[6, 8]
%13 = _c10d_functional.reduce_scatter_tensor.default(%12, 'sum', 2, G0)  : f32[3, 8]
%14 = _c10d_functional.wait_tensor.default(%13)  : f32[3, 8]
%15 = fxsp.fused_add_rms_norm.default(%14, %8, %4, 1e-06)  : (f32[3, 8], f32[3, 8])
%16 = operator.getitem(%15, 0)  : f32[3, 8]
%17 = _c10d_functional.all_gather_into_tensor.default(%16, 2, G0)  : f32[6, 8]
%18 = _c10d_functional.wait_tensor.default(%17)  : f32[6, 8]
%19 = aten.view.default(%18, [2, 3, 8])  : f32[2, 3, 8]
return (%19,)""",
        )

    def test_prompt_embeds_residual_is_sliced(self):
        (report,) = compile_reports(Block(layers=1, prompt_embeds=True), torch.randn(4, 8))
        self.assertEqual(report.counts["sp.first"], 0)
        self.assertExpectedInline(
            report.rewritten,
            """\
%0 = input('arg0_1')  : f32[8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[8, 8]
%3 = input('arg3_1')  : f32[8]
%4 = aten.slice.Tensor(%1, 0, 0, 2)  : f32[2, 8]
%5 = fxsp.rms_norm.default(%1, %0, 1e-06)  : f32[4, 8]
%6 = aten.mm.default(%5, %2)  : f32[4, 8]
%7 = _c10d_functional.reduce_scatter_tensor.default(%6, 'sum', 2, G0)  : f32[2, 8]
%8 = _c10d_functional.wait_tensor.default(%7)  : f32[2, 8]
%9 = fxsp.fused_add_rms_norm.default(%8, %4, %3, 1e-06)  : (f32[2, 8], f32[2, 8])
%10 = operator.getitem(%9, 0)  : f32[2, 8]
%11 = _c10d_functional.all_gather_into_tensor.default(%10, 2, G0)  : f32[4, 8]
%12 = _c10d_functional.wait_tensor.default(%11)  : f32[4, 8]
return (%12,)""",
        )

    def test_fp8_gathers_bytes(self):
        (report,) = compile_reports(Block(layers=1, fp8=True), torch.randn(4, 8))
        self.assertEqual(report.counts["sp.first_fp8"], 1)
        self.assertExpectedInline(
            report.rewritten,
            """\
%0 = input('arg0_1')  : f32[8, 8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[8]
%3 = input('arg3_1')  : f32[8, 8]
%4 = input('arg4_1')  : f32[8]
%5 = aten.mm.default(%1, %0)  : f32[4, 8]
%6 = _c10d_functional.reduce_scatter_tensor.default(%5, 'sum', 2, G0)  : f32[2, 8]
%7 = _c10d_functional.wait_tensor.default(%6)  : f32[2, 8]
%8 = fxsp.rms_norm.default(%7, %2, 1e-06)  : f32[2, 8]
%9 = aten.full.default([], 0.5, dtype=torch.float32)  : f32[]
%10 = fxsp.static_fp8_quant.default(%8, %9, torch.float8_e4m3fn)  : f8e4m3fn[2, 8]
%11 = aten.view.dtype(%10, torch.uint8)  : u8[2, 8]
%12 = _c10d_functional.all_gather_into_tensor.default(%11, 2, G0)  : u8[4, 8]
%13 = _c10d_functional.wait_tensor.default(%12)  : u8[4, 8]
%14 = aten.view.dtype(%13, torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
%15 = prims.convert_element_type.default(%14, torch.float32)  : f32[4, 8]
%16 = aten.mul.Tensor(%15, %9)  : f32[4, 8]
%17 = aten.mm.default(%16, %3)  : f32[4, 8]
%18 = _c10d_functional.reduce_scatter_tensor.default(%17, 'sum', 2, G0)  : f32[2, 8]
%19 = _c10d_functional.wait_tensor.default(%18)  : f32[2, 8]
%20 = fxsp.fused_add_rms_norm.default(%19, %7, %4, 1e-06)  : (f32[2, 8], f32[2, 8])
%21 = operator.getitem(%20, 0)  : f32[2, 8]
%22 = _c10d_functional.all_gather_into_tensor.default(%21, 2, G0)  : f32[4, 8]
%23 = _c10d_functional.wait_tensor.default(%22)  : f32[4, 8]
return (%23,)""",
        )

    def test_dynamic_rows(self):
        (report,) = compile_reports(Block(layers=1), torch.randn(6, 8), dynamic=True)
        self.assertExpectedInline(
            report.rewritten,
            """\
%0 = input('arg0_1')  : f32[8, 8]
%1 = input('arg1_1')  : SymInt
%2 = input('arg2_1')  : f32[s77, 8]
%3 = input('arg3_1')  : f32[8]
%4 = input('arg4_1')  : f32[8, 8]
%5 = input('arg5_1')  : f32[8]
%6 = aten.sym_size.int(%2, 0)  : SymInt
%7 = operator.add(%6, 1)  : SymInt
%8 = operator.floordiv(%7, 2)  : SymInt
%9 = operator.mul(%8, 2)  : SymInt
%10 = operator.sub(%9, %6)  : SymInt
%11 = aten.constant_pad_nd.default(%2, [0, 0, 0, %10], 0.0)  : f32[2*(((s77 + 1)//2)), 8]
%12 = aten.mm.default(%11, %0)  : f32[2*(((s77 + 1)//2)), 8]
%13 = _c10d_functional.reduce_scatter_tensor.default(%12, 'sum', 2, G0)  : f32[((s77 + 1)//2), 8]
%14 = _c10d_functional.wait_tensor.default(%13)  : f32[((s77 + 1)//2), 8]
%15 = fxsp.rms_norm.default(%14, %3, 1e-06)  : f32[((s77 + 1)//2), 8]
%16 = _c10d_functional.all_gather_into_tensor.default(%15, 2, G0)  : f32[2*(((s77 + 1)//2)), 8]
%17 = _c10d_functional.wait_tensor.default(%16)  : f32[2*(((s77 + 1)//2)), 8]
%18 = aten.mm.default(%17, %4)  : f32[2*(((s77 + 1)//2)), 8]
%19 = _c10d_functional.reduce_scatter_tensor.default(%18, 'sum', 2, G0)  : f32[((s77 + 1)//2), 8]
%20 = _c10d_functional.wait_tensor.default(%19)  : f32[((s77 + 1)//2), 8]
%21 = fxsp.fused_add_rms_norm.default(%20, %14, %5, 1e-06)  : (f32[((s77 + 1)//2), 8], f32[((s77 + 1)//2), 8])
%22 = operator.getitem(%21, 0)  : f32[((s77 + 1)//2), 8]
%23 = _c10d_functional.all_gather_into_tensor.default(%22, 2, G0)  : f32[2*(((s77 + 1)//2)), 8]
%24 = _c10d_functional.wait_tensor.default(%23)  : f32[2*(((s77 + 1)//2)), 8]
%25 = aten.as_strided.default(%24, [%6, 8], [8, 1], 0)  : f32[s77, 8]
return (%25,)""",
        )

    def test_graph_break_keeps_outputs_full_size(self):
        first, second = compile_reports(Block(layers=2, graph_break=True), torch.randn(4, 8))
        # The first graph returns its last residual in full: SP would all-gather it beside the
        # norm's output, more bytes than the all-reduce, and so would the first norm's site,
        # whose residual feeds that one. It stays plain TP, and says why.
        self.assertIn("SP would send more than the all-reduce", str(first.misses["sp.middle"]))
        self.assertExpectedInline(
            first.rewritten,
            """\
%0 = input('arg0_1')  : f32[8, 8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[8]
%3 = input('arg3_1')  : f32[8, 8]
%4 = input('arg4_1')  : f32[8]
%5 = aten.mm.default(%1, %0)  : f32[4, 8]
%6 = fxsp.all_reduce.default(%5, G0, 'c10d')  : f32[4, 8]
%7 = fxsp.rms_norm.default(%6, %2, 1e-06)  : f32[4, 8]
%8 = aten.mm.default(%7, %3)  : f32[4, 8]
%9 = fxsp.all_reduce.default(%8, G0, 'c10d')  : f32[4, 8]
%10 = fxsp.fused_add_rms_norm.default(%9, %6, %4, 1e-06)  : (f32[4, 8], f32[4, 8])
%11 = operator.getitem(%10, 0)  : f32[4, 8]
%12 = operator.getitem(%10, 1)  : f32[4, 8]
return (%11, %12)""",
        )
        self.assertExpectedInline(
            second.rewritten,
            """\
%0 = input('arg0_1')  : f32[8, 8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[4, 8]
%3 = input('arg3_1')  : f32[8]
%4 = aten.slice.Tensor(%2, 0, 0, 2)  : f32[2, 8]
%5 = aten.mm.default(%1, %0)  : f32[4, 8]
%6 = _c10d_functional.reduce_scatter_tensor.default(%5, 'sum', 2, G0)  : f32[2, 8]
%7 = _c10d_functional.wait_tensor.default(%6)  : f32[2, 8]
%8 = fxsp.fused_add_rms_norm.default(%7, %4, %3, 1e-06)  : (f32[2, 8], f32[2, 8])
%9 = operator.getitem(%8, 0)  : f32[2, 8]
%10 = _c10d_functional.all_gather_into_tensor.default(%9, 2, G0)  : f32[4, 8]
%11 = _c10d_functional.wait_tensor.default(%10)  : f32[4, 8]
return (%11,)""",
        )

    def test_min_tokens_keeps_small_batches(self):
        (report,) = compile_reports(Block(layers=1), torch.randn(4, 8), min_tokens=8)
        self.assertEqual(sum(report.counts[k] for k in report.counts if k.startswith("sp.")), 0)
        self.assertIn("4 rows < min_tokens 8", str(report.misses["sp.first"]))


@pytest.mark.parametrize("fake_pg", [4], indirect=True)
def test_world_of_four(fake_pg):
    (report,) = compile_reports(Block(layers=1), torch.randn(6, 8))
    text = report.rewritten
    assert "reduce_scatter_tensor.default(%" in text and "'sum', 4, G0)" in text
    assert "constant_pad_nd.default(%" in text and "[0, 0, 0, 2]" in text  # 6 rows → 8
    assert report.counts["sp.first"] == 1 and report.counts["sp.last"] == 1


def test_identity_reshape_does_not_hide_the_all_reduce(fake_pg):
    """MoE blocks often reshape their all-reduced output back to the input's shape."""

    class ReshapedBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            out = funcol.all_reduce(x @ self.w, "sum", dist.group.WORLD).reshape(x.shape)
            h = residual + out
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)

    backend = fxsp.backend(None, inner="eager")
    with torch.no_grad():
        torch.compile(ReshapedBlock(), backend=backend)(torch.randn(4, 8), torch.randn(4, 8))
    assert backend.reports[-1].counts["sp.last"] == 1
