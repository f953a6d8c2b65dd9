"""Raising, spelling by spelling: the post-grad graph Inductor hands fxsp, and the graph after
`raise_ir` (golden text), then the look-alikes that must stay as they are, each with the reason
the report gives.

The spellings are the catalogue in tests/support.py, which the numerics and compile tests reuse.
Regenerate the expected strings with `EXPECTTEST_ACCEPT=1 pytest tests/test_ir_raising.py`, then
read the diff: the text is the spec."""

from __future__ import annotations

import operator

import expecttest
import pytest
import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import fxsp
from fxsp.ir import IR_OPS, raise_ir
from tests.support import (
    BF16,
    COLLECTIVES,
    E4M3,
    E4M3_FNUZ,
    F16,
    F32,
    NORMS,
    QUANTS,
    Capture,
    H,
    Spelling,
    add_norm,
    capture,
    counts,
    fp8_div,
    fused_rms_norm_graph,
    hf,
    make_inputs,
    normed,
    torch_rms_norm,
    vllm_c_fp8,
)
from tests.vllm_standins import register_vllm_standins

register_vllm_standins()


def ir_nodes(gm: GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in IR_OPS]


def explain(reports: list) -> str:
    return "\n".join(r.explain() for r in reports)


def raised(gm: GraphModule) -> str:
    """Golden text: the graph, what fired, the raised graph."""
    before = fxsp.golden(gm)
    fired = counts(raise_ir(gm, check=True))
    raised = ", ".join(f"{k}={v}" for k, v in fired.items()) or "nothing raised"
    return f"{before}\n--- {raised}\n{fxsp.golden(gm)}"


def spelled(spelling: Spelling, arg, dtype: torch.dtype = F32) -> GraphModule:
    return capture(spelling.build(arg), *make_inputs(spelling.inputs, dtype))


# ---------------------------------------------------------------------------------------------
# Golden tests: one per spelling
# ---------------------------------------------------------------------------------------------


class TestRaiseNorms(expecttest.TestCase):
    def test_hf_fp32_weight_left(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["hf"], 1e-6)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = aten.pow.Tensor_Scalar(%0, 2)  : f32[4, 8]
%3 = aten.mean.dim(%2, [-1], True)  : f32[4, 1]
%4 = aten.add.Tensor(%3, 1e-06)  : f32[4, 1]
%5 = aten.rsqrt.default(%4)  : f32[4, 1]
%6 = aten.mul.Tensor(%0, %5)  : f32[4, 8]
%7 = aten.mul.Tensor(%1, %6)  : f32[4, 8]
return (%7,)
--- raise.rms_norm=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = fxsp.rms_norm.default(%0, %1, 1e-06)  : f32[4, 8]
return (%2,)""",
        )

    def test_hf_fp32_weight_right(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["hf_weight_right"], 1e-6)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = aten.pow.Tensor_Scalar(%0, 2)  : f32[4, 8]
%3 = aten.mean.dim(%2, [-1], True)  : f32[4, 1]
%4 = aten.add.Tensor(%3, 1e-06)  : f32[4, 1]
%5 = aten.rsqrt.default(%4)  : f32[4, 1]
%6 = aten.mul.Tensor(%0, %5)  : f32[4, 8]
%7 = aten.mul.Tensor(%6, %1)  : f32[4, 8]
return (%7,)
--- raise.rms_norm=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = fxsp.rms_norm.default(%0, %1, 1e-06)  : f32[4, 8]
return (%2,)""",
        )

    def test_hf_bf16_down_cast_before_weight(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["hf"], 1e-5, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%3 = aten.pow.Tensor_Scalar(%2, 2)  : f32[4, 8]
%4 = aten.mean.dim(%3, [-1], True)  : f32[4, 1]
%5 = aten.add.Tensor(%4, 1e-05)  : f32[4, 1]
%6 = aten.rsqrt.default(%5)  : f32[4, 1]
%7 = aten.mul.Tensor(%2, %6)  : f32[4, 8]
%8 = prims.convert_element_type.default(%7, torch.bfloat16)  : bf16[4, 8]
%9 = aten.mul.Tensor(%1, %8)  : bf16[4, 8]
return (%9,)
--- raise.rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = fxsp.rms_norm.default(%0, %1, 1e-05)  : bf16[4, 8]
return (%2,)""",
        )

    def test_hf_fp16_down_cast_after_weight(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["hf_down_after"], 1e-5, F16)),
            """\
%0 = input('arg0_1')  : f16[4, 8]
%1 = input('arg1_1')  : f16[8]
%2 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%3 = aten.pow.Tensor_Scalar(%2, 2)  : f32[4, 8]
%4 = aten.mean.dim(%3, [-1], True)  : f32[4, 1]
%5 = aten.add.Tensor(%4, 1e-05)  : f32[4, 1]
%6 = aten.rsqrt.default(%5)  : f32[4, 1]
%7 = aten.mul.Tensor(%2, %6)  : f32[4, 8]
%8 = aten.mul.Tensor(%7, %1)  : f32[4, 8]
%9 = prims.convert_element_type.default(%8, torch.float16)  : f16[4, 8]
return (%9,)
--- raise.rms_norm=1
%0 = input('arg0_1')  : f16[4, 8]
%1 = input('arg1_1')  : f16[8]
%2 = fxsp.rms_norm.default(%0, %1, 1e-05)  : f16[4, 8]
return (%2,)""",
        )

    def test_hf_bf16_no_weight(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["hf_no_weight"], 1e-6, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%2 = aten.pow.Tensor_Scalar(%1, 2)  : f32[4, 8]
%3 = aten.mean.dim(%2, [-1], True)  : f32[4, 1]
%4 = aten.add.Tensor(%3, 1e-06)  : f32[4, 1]
%5 = aten.rsqrt.default(%4)  : f32[4, 1]
%6 = aten.mul.Tensor(%1, %5)  : f32[4, 8]
%7 = prims.convert_element_type.default(%6, torch.bfloat16)  : bf16[4, 8]
return (%7,)
--- raise.rms_norm_unweighted=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = fxsp.rms_norm.default(%0, None, 1e-06)  : bf16[4, 8]
return (%1,)""",
        )

    def test_torch_rms_norm_fp32(self):
        # positive mean dim, add.Scalar with eps rounded to fp32, weight on the right
        self.assertExpectedInline(
            raised(spelled(NORMS["torch_rms_norm"], 1e-6)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = aten.pow.Tensor_Scalar(%0, 2)  : f32[4, 8]
%3 = aten.mean.dim(%2, [1], True)  : f32[4, 1]
%4 = aten.add.Scalar(%3, 9.999999974752427e-07)  : f32[4, 1]
%5 = aten.rsqrt.default(%4)  : f32[4, 1]
%6 = aten.mul.Tensor(%0, %5)  : f32[4, 8]
%7 = aten.mul.Tensor(%6, %1)  : f32[4, 8]
return (%7,)
--- raise.rms_norm=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = fxsp.rms_norm.default(%0, %1, 9.999999974752427e-07)  : f32[4, 8]
return (%2,)""",
        )

    def test_torch_rms_norm_bf16(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["torch_rms_norm"], 1e-6, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%3 = aten.pow.Tensor_Scalar(%2, 2)  : f32[4, 8]
%4 = aten.mean.dim(%3, [1], True)  : f32[4, 1]
%5 = aten.add.Scalar(%4, 9.999999974752427e-07)  : f32[4, 1]
%6 = aten.rsqrt.default(%5)  : f32[4, 1]
%7 = aten.mul.Tensor(%2, %6)  : f32[4, 8]
%8 = aten.mul.Tensor(%7, %1)  : f32[4, 8]
%9 = prims.convert_element_type.default(%8, torch.bfloat16)  : bf16[4, 8]
return (%9,)
--- raise.rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = fxsp.rms_norm.default(%0, %1, 9.999999974752427e-07)  : bf16[4, 8]
return (%2,)""",
        )

    def test_torch_rms_norm_no_weight_fp16(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["torch_rms_norm_no_weight"], 0.1, F16)),
            """\
%0 = input('arg0_1')  : f16[4, 8]
%1 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%2 = aten.pow.Tensor_Scalar(%1, 2)  : f32[4, 8]
%3 = aten.mean.dim(%2, [1], True)  : f32[4, 1]
%4 = aten.add.Scalar(%3, 0.10000000149011612)  : f32[4, 1]
%5 = aten.rsqrt.default(%4)  : f32[4, 1]
%6 = aten.mul.Tensor(%1, %5)  : f32[4, 8]
%7 = prims.convert_element_type.default(%6, torch.float16)  : f16[4, 8]
return (%7,)
--- raise.rms_norm_unweighted=1
%0 = input('arg0_1')  : f16[4, 8]
%1 = fxsp.rms_norm.default(%0, None, 0.10000000149011612)  : f16[4, 8]
return (%1,)""",
        )

    def test_nn_rms_norm_bf16(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["nn_rms_norm"], 1e-5, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%3 = aten.pow.Tensor_Scalar(%2, 2)  : f32[4, 8]
%4 = aten.mean.dim(%3, [1], True)  : f32[4, 1]
%5 = aten.add.Scalar(%4, 9.999999747378752e-06)  : f32[4, 1]
%6 = aten.rsqrt.default(%5)  : f32[4, 1]
%7 = aten.mul.Tensor(%2, %6)  : f32[4, 8]
%8 = aten.mul.Tensor(%7, %1)  : f32[4, 8]
%9 = prims.convert_element_type.default(%8, torch.bfloat16)  : bf16[4, 8]
return (%9,)
--- raise.rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = fxsp.rms_norm.default(%0, %1, 9.999999747378752e-06)  : bf16[4, 8]
return (%2,)""",
        )

    def test_torch_rms_norm_bf16_with_fp32_weight(self):
        # torch keeps the input dtype: fxsp.rms_norm's fp32 result is cast back
        gm = capture(torch_rms_norm(1e-6), make_inputs("x", BF16)[0], torch.ones(H))
        self.assertExpectedInline(
            raised(gm),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%3 = aten.pow.Tensor_Scalar(%2, 2)  : f32[4, 8]
%4 = aten.mean.dim(%3, [1], True)  : f32[4, 1]
%5 = aten.add.Scalar(%4, 9.999999974752427e-07)  : f32[4, 1]
%6 = aten.rsqrt.default(%5)  : f32[4, 1]
%7 = aten.mul.Tensor(%2, %6)  : f32[4, 8]
%8 = aten.mul.Tensor(%7, %1)  : f32[4, 8]
%9 = prims.convert_element_type.default(%8, torch.bfloat16)  : bf16[4, 8]
return (%9,)
--- raise.rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = fxsp.rms_norm.default(%0, %1, 9.999999974752427e-07)  : f32[4, 8]
%3 = prims.convert_element_type.default(%2, torch.bfloat16)  : bf16[4, 8]
return (%3,)""",
        )

    def test_gemma_one_plus_weight(self):
        # raised as a correct variant: the weight is the computed (1 + w)
        self.assertExpectedInline(
            raised(spelled(NORMS["gemma"], 1e-6, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%3 = aten.pow.Tensor_Scalar(%2, 2)  : f32[4, 8]
%4 = aten.mean.dim(%3, [-1], True)  : f32[4, 1]
%5 = aten.add.Tensor(%4, 1e-06)  : f32[4, 1]
%6 = aten.rsqrt.default(%5)  : f32[4, 1]
%7 = aten.mul.Tensor(%2, %6)  : f32[4, 8]
%8 = prims.convert_element_type.default(%1, torch.float32)  : f32[8]
%9 = aten.add.Tensor(%8, 1.0)  : f32[8]
%10 = aten.mul.Tensor(%7, %9)  : f32[4, 8]
%11 = prims.convert_element_type.default(%10, torch.bfloat16)  : bf16[4, 8]
return (%11,)
--- raise.rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = prims.convert_element_type.default(%1, torch.float32)  : f32[8]
%3 = aten.add.Tensor(%2, 1.0)  : f32[8]
%4 = fxsp.rms_norm.default(%0, %3, 1e-06)  : f32[4, 8]
%5 = prims.convert_element_type.default(%4, torch.bfloat16)  : bf16[4, 8]
return (%5,)""",
        )

    def test_torch_rms_norm_bf16_non_contiguous_input(self):
        # torch's decomposition clones the fp32 result to make it contiguous
        gm = capture(
            lambda x, w: F.rms_norm(x.t(), (H,), w, 1e-6),
            make_inputs("x", BF16, rows=H, hidden=4)[0],
            torch.ones(H, dtype=BF16),
        )
        self.assertExpectedInline(
            raised(gm),
            """\
%0 = input('arg0_1')  : bf16[8, 4]
%1 = input('arg1_1')  : bf16[8]
%2 = aten.permute.default(%0, [1, 0])  : bf16[4, 8]
%3 = prims.convert_element_type.default(%2, torch.float32)  : f32[4, 8]
%4 = aten.pow.Tensor_Scalar(%3, 2)  : f32[4, 8]
%5 = aten.mean.dim(%4, [1], True)  : f32[4, 1]
%6 = aten.add.Scalar(%5, 9.999999974752427e-07)  : f32[4, 1]
%7 = aten.rsqrt.default(%6)  : f32[4, 1]
%8 = aten.mul.Tensor(%3, %7)  : f32[4, 8]
%9 = aten.mul.Tensor(%8, %1)  : f32[4, 8]
%10 = aten.clone.default(%9, memory_format=torch.contiguous_format)  : f32[4, 8]
%11 = prims.convert_element_type.default(%10, torch.bfloat16)  : bf16[4, 8]
return (%11,)
--- raise.rms_norm=1
%0 = input('arg0_1')  : bf16[8, 4]
%1 = input('arg1_1')  : bf16[8]
%2 = aten.permute.default(%0, [1, 0])  : bf16[4, 8]
%3 = fxsp.rms_norm.default(%2, %1, 9.999999974752427e-07)  : bf16[4, 8]
return (%3,)""",
        )

    def test_undecomposed_fused_rms_norm(self):
        # torch's fused op, kept whole (export; torch versions or backends without its
        # decomposition): its default eps is fp32's machine epsilon
        self.assertExpectedInline(
            raised(fused_rms_norm_graph(*make_inputs("xw", BF16), None)),
            """\
%0 = input('x')  : bf16[4, 8]
%1 = input('w')  : bf16[8]
%2 = aten._fused_rms_norm.default(%0, [8], %1, None)  : (bf16[4, 8], f32[4, 1])
%3 = operator.getitem(%2, 0)  : bf16[4, 8]
return (%3,)
--- raise.aten_rms_norm=1
%0 = input('x')  : bf16[4, 8]
%1 = input('w')  : bf16[8]
%2 = fxsp.rms_norm.default(%0, %1, 1.1920928955078125e-07)  : bf16[4, 8]
return (%2,)""",
        )

    def test_two_norms_share_an_upcast(self):
        # one fp32 copy of x read by both norms: the first raise keeps it for the second
        def two(x, w):
            xf = x.float()
            a = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
            b = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
            return w * a.to(x.dtype), (b * w).to(x.dtype)

        self.assertExpectedInline(
            raised(capture(two, *make_inputs("xw", F16))),
            """\
%0 = input('arg0_1')  : f16[4, 8]
%1 = input('arg1_1')  : f16[8]
%2 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%3 = aten.pow.Tensor_Scalar(%2, 2)  : f32[4, 8]
%4 = aten.mean.dim(%3, [-1], True)  : f32[4, 1]
%5 = aten.add.Tensor(%4, 1e-06)  : f32[4, 1]
%6 = aten.rsqrt.default(%5)  : f32[4, 1]
%7 = aten.mul.Tensor(%2, %6)  : f32[4, 8]
%8 = prims.convert_element_type.default(%7, torch.float16)  : f16[4, 8]
%9 = aten.mul.Tensor(%1, %8)  : f16[4, 8]
%10 = aten.pow.Tensor_Scalar(%2, 2)  : f32[4, 8]
%11 = aten.mean.dim(%10, [-1], True)  : f32[4, 1]
%12 = aten.add.Tensor(%11, 1e-05)  : f32[4, 1]
%13 = aten.rsqrt.default(%12)  : f32[4, 1]
%14 = aten.mul.Tensor(%2, %13)  : f32[4, 8]
%15 = aten.mul.Tensor(%14, %1)  : f32[4, 8]
%16 = prims.convert_element_type.default(%15, torch.float16)  : f16[4, 8]
return (%9, %16)
--- raise.rms_norm=2
%0 = input('arg0_1')  : f16[4, 8]
%1 = input('arg1_1')  : f16[8]
%2 = fxsp.rms_norm.default(%0, %1, 1e-05)  : f16[4, 8]
%3 = fxsp.rms_norm.default(%0, %1, 1e-06)  : f16[4, 8]
return (%3, %2)""",
        )


class TestRaiseResidualAdd(expecttest.TestCase):
    def test_add_then_norm(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["add_norm"], 1e-6, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[4, 8]
%2 = input('arg2_1')  : bf16[8]
%3 = aten.add.Tensor(%0, %1)  : bf16[4, 8]
%4 = prims.convert_element_type.default(%3, torch.float32)  : f32[4, 8]
%5 = aten.pow.Tensor_Scalar(%4, 2)  : f32[4, 8]
%6 = aten.mean.dim(%5, [-1], True)  : f32[4, 1]
%7 = aten.add.Tensor(%6, 1e-06)  : f32[4, 1]
%8 = aten.rsqrt.default(%7)  : f32[4, 1]
%9 = aten.mul.Tensor(%4, %8)  : f32[4, 8]
%10 = prims.convert_element_type.default(%9, torch.bfloat16)  : bf16[4, 8]
%11 = aten.mul.Tensor(%2, %10)  : bf16[4, 8]
return (%11, %3)
--- raise.rms_norm=1, raise.add_rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[4, 8]
%2 = input('arg2_1')  : bf16[8]
%3 = fxsp.fused_add_rms_norm.default(%0, %1, %2, 1e-06)  : (bf16[4, 8], bf16[4, 8])
%4 = operator.getitem(%3, 0)  : bf16[4, 8]
%5 = operator.getitem(%3, 1)  : bf16[4, 8]
return (%4, %5)""",
        )

    def test_add_swapped_then_norm(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["add_norm_swapped"], 1e-6)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[8]
%3 = aten.add.Tensor(%1, %0)  : f32[4, 8]
%4 = aten.pow.Tensor_Scalar(%3, 2)  : f32[4, 8]
%5 = aten.mean.dim(%4, [1], True)  : f32[4, 1]
%6 = aten.add.Scalar(%5, 9.999999974752427e-07)  : f32[4, 1]
%7 = aten.rsqrt.default(%6)  : f32[4, 1]
%8 = aten.mul.Tensor(%3, %7)  : f32[4, 8]
%9 = aten.mul.Tensor(%8, %2)  : f32[4, 8]
return (%9, %3)
--- raise.rms_norm=1, raise.add_rms_norm=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[8]
%3 = fxsp.fused_add_rms_norm.default(%1, %0, %2, 9.999999974752427e-07)  : (f32[4, 8], f32[4, 8])
%4 = operator.getitem(%3, 0)  : f32[4, 8]
%5 = operator.getitem(%3, 1)  : f32[4, 8]
return (%4, %5)""",
        )

    def test_two_layers(self):
        # the residual stream threads through both fused ops
        def layers(x, residual, w):
            out, h = add_norm(1e-6)(x, residual, w)
            return add_norm(1e-6)(out * 2, h, w)

        self.assertExpectedInline(
            raised(capture(layers, *make_inputs("xrw"))),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[8]
%3 = aten.add.Tensor(%0, %1)  : f32[4, 8]
%4 = aten.pow.Tensor_Scalar(%3, 2)  : f32[4, 8]
%5 = aten.mean.dim(%4, [-1], True)  : f32[4, 1]
%6 = aten.add.Tensor(%5, 1e-06)  : f32[4, 1]
%7 = aten.rsqrt.default(%6)  : f32[4, 1]
%8 = aten.mul.Tensor(%3, %7)  : f32[4, 8]
%9 = aten.mul.Tensor(%2, %8)  : f32[4, 8]
%10 = aten.mul.Tensor(%9, 2)  : f32[4, 8]
%11 = aten.add.Tensor(%10, %3)  : f32[4, 8]
%12 = aten.pow.Tensor_Scalar(%11, 2)  : f32[4, 8]
%13 = aten.mean.dim(%12, [-1], True)  : f32[4, 1]
%14 = aten.add.Tensor(%13, 1e-06)  : f32[4, 1]
%15 = aten.rsqrt.default(%14)  : f32[4, 1]
%16 = aten.mul.Tensor(%11, %15)  : f32[4, 8]
%17 = aten.mul.Tensor(%2, %16)  : f32[4, 8]
return (%17, %11)
--- raise.rms_norm=2, raise.add_rms_norm=2
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[8]
%3 = fxsp.fused_add_rms_norm.default(%0, %1, %2, 1e-06)  : (f32[4, 8], f32[4, 8])
%4 = operator.getitem(%3, 0)  : f32[4, 8]
%5 = operator.getitem(%3, 1)  : f32[4, 8]
%6 = aten.mul.Tensor(%4, 2)  : f32[4, 8]
%7 = fxsp.fused_add_rms_norm.default(%6, %5, %2, 1e-06)  : (f32[4, 8], f32[4, 8])
%8 = operator.getitem(%7, 0)  : f32[4, 8]
%9 = operator.getitem(%7, 1)  : f32[4, 8]
return (%8, %9)""",
        )


class TestRaiseLayerNorms(expecttest.TestCase):
    def test_torch_layer_norm_bf16(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["torch_layer_norm"], 1e-5, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = input('arg2_1')  : bf16[8]
%3 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%4 = aten.var_mean.correction(%3, [1], correction=0, keepdim=True)  : (f32[4, 1], f32[4, 1])
%5 = operator.getitem(%4, 0)  : f32[4, 1]
%6 = operator.getitem(%4, 1)  : f32[4, 1]
%7 = aten.sub.Tensor(%3, %6)  : f32[4, 8]
%8 = aten.add.Tensor(%5, 1e-05)  : f32[4, 1]
%9 = aten.rsqrt.default(%8)  : f32[4, 1]
%10 = aten.mul.Tensor(%7, %9)  : f32[4, 8]
%11 = aten.mul.Tensor(%10, %1)  : f32[4, 8]
%12 = aten.add.Tensor(%11, %2)  : f32[4, 8]
%13 = prims.convert_element_type.default(%12, torch.bfloat16)  : bf16[4, 8]
return (%13,)
--- raise.layer_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = input('arg2_1')  : bf16[8]
%3 = fxsp.layer_norm.default(%0, %1, %2, 1e-05)  : bf16[4, 8]
return (%3,)""",
        )

    def test_layer_norm_without_weight_or_bias(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["torch_layer_norm_plain"], 1e-5)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = aten.var_mean.correction(%0, [1], correction=0, keepdim=True)  : (f32[4, 1], f32[4, 1])
%2 = operator.getitem(%1, 0)  : f32[4, 1]
%3 = operator.getitem(%1, 1)  : f32[4, 1]
%4 = aten.sub.Tensor(%0, %3)  : f32[4, 8]
%5 = aten.add.Tensor(%2, 1e-05)  : f32[4, 1]
%6 = aten.rsqrt.default(%5)  : f32[4, 1]
%7 = aten.mul.Tensor(%4, %6)  : f32[4, 8]
return (%7,)
--- raise.layer_norm_unweighted=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = fxsp.layer_norm.default(%0, None, None, 1e-05)  : f32[4, 8]
return (%1,)""",
        )

    def test_nemotron_one_plus_weight(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["layer_norm_1p"], 1e-5)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = input('arg2_1')  : f32[8]
%3 = aten.var_mean.correction(%0, [1], correction=0, keepdim=True)  : (f32[4, 1], f32[4, 1])
%4 = operator.getitem(%3, 0)  : f32[4, 1]
%5 = operator.getitem(%3, 1)  : f32[4, 1]
%6 = aten.sub.Tensor(%0, %5)  : f32[4, 8]
%7 = aten.add.Tensor(%4, 1e-05)  : f32[4, 1]
%8 = aten.rsqrt.default(%7)  : f32[4, 1]
%9 = aten.mul.Tensor(%6, %8)  : f32[4, 8]
%10 = aten.add.Tensor(%1, 1)  : f32[8]
%11 = aten.mul.Tensor(%9, %10)  : f32[4, 8]
%12 = aten.add.Tensor(%11, %2)  : f32[4, 8]
return (%12,)
--- raise.layer_norm=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = input('arg2_1')  : f32[8]
%3 = aten.add.Tensor(%1, 1)  : f32[8]
%4 = fxsp.layer_norm.default(%0, %3, %2, 1e-05)  : f32[4, 8]
return (%4,)""",
        )

    def test_cohere_two_passes_bf16(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["cohere_layer_norm"], 1e-5, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = prims.convert_element_type.default(%1, torch.float32)  : f32[8]
%3 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%4 = aten.mean.dim(%3, [-1], True)  : f32[4, 1]
%5 = aten.sub.Tensor(%3, %4)  : f32[4, 8]
%6 = aten.sub.Tensor(%3, %4)  : f32[4, 8]
%7 = aten.pow.Tensor_Scalar(%6, 2)  : f32[4, 8]
%8 = aten.mean.dim(%7, [-1], True)  : f32[4, 1]
%9 = aten.add.Tensor(%8, 1e-05)  : f32[4, 1]
%10 = aten.rsqrt.default(%9)  : f32[4, 1]
%11 = aten.mul.Tensor(%5, %10)  : f32[4, 8]
%12 = aten.mul.Tensor(%2, %11)  : f32[4, 8]
%13 = prims.convert_element_type.default(%12, torch.bfloat16)  : bf16[4, 8]
return (%13,)
--- raise.layer_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = prims.convert_element_type.default(%1, torch.float32)  : f32[8]
%3 = fxsp.layer_norm.default(%0, %2, None, 1e-05)  : bf16[4, 8]
return (%3,)""",
        )

    def test_mean_then_var(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["var_layer_norm"], 1e-5)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = input('arg2_1')  : f32[8]
%3 = aten.mean.dim(%0, [-1], True)  : f32[4, 1]
%4 = aten.sub.Tensor(%0, %3)  : f32[4, 8]
%5 = aten.var.correction(%0, [-1], correction=0, keepdim=True)  : f32[4, 1]
%6 = aten.add.Tensor(%5, 1e-05)  : f32[4, 1]
%7 = aten.rsqrt.default(%6)  : f32[4, 1]
%8 = aten.mul.Tensor(%4, %7)  : f32[4, 8]
%9 = aten.mul.Tensor(%8, %1)  : f32[4, 8]
%10 = aten.add.Tensor(%9, %2)  : f32[4, 8]
return (%10,)
--- raise.layer_norm=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8]
%2 = input('arg2_1')  : f32[8]
%3 = fxsp.layer_norm.default(%0, %1, %2, 1e-05)  : f32[4, 8]
return (%3,)""",
        )

    def test_add_then_layer_norm(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["add_layer_norm"], 1e-5)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[8]
%3 = input('arg3_1')  : f32[8]
%4 = aten.add.Tensor(%1, %0)  : f32[4, 8]
%5 = aten.var_mean.correction(%4, [1], correction=0, keepdim=True)  : (f32[4, 1], f32[4, 1])
%6 = operator.getitem(%5, 0)  : f32[4, 1]
%7 = operator.getitem(%5, 1)  : f32[4, 1]
%8 = aten.sub.Tensor(%4, %7)  : f32[4, 8]
%9 = aten.add.Tensor(%6, 1e-05)  : f32[4, 1]
%10 = aten.rsqrt.default(%9)  : f32[4, 1]
%11 = aten.mul.Tensor(%8, %10)  : f32[4, 8]
%12 = aten.mul.Tensor(%11, %2)  : f32[4, 8]
%13 = aten.add.Tensor(%12, %3)  : f32[4, 8]
return (%13, %4)
--- raise.layer_norm=1, raise.add_layer_norm=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[8]
%3 = input('arg3_1')  : f32[8]
%4 = fxsp.fused_add_layer_norm.default(%1, %0, %2, %3, 1e-05)  : (f32[4, 8], f32[4, 8])
%5 = operator.getitem(%4, 0)  : f32[4, 8]
%6 = operator.getitem(%4, 1)  : f32[4, 8]
return (%5, %6)""",
        )

    def test_undecomposed_native_layer_norm(self):
        x, w, b = make_inputs("xwb", F32)
        graph = torch.fx.Graph()
        args = [graph.placeholder(name) for name in "xwb"]
        fused = graph.call_function(
            torch.ops.aten.native_layer_norm.default, (args[0], [H], args[1], args[2], 1e-5)
        )
        graph.output((graph.call_function(operator.getitem, (fused, 0)),))
        gm = GraphModule({}, graph)
        FakeTensorProp(gm).propagate(x, w, b)
        self.assertExpectedInline(
            raised(gm),
            """\
%0 = input('x')  : f32[4, 8]
%1 = input('w')  : f32[8]
%2 = input('b')  : f32[8]
%3 = aten.native_layer_norm.default(%0, [8], %1, %2, 1e-05)  : (f32[4, 8], f32[4, 1], f32[4, 1])
%4 = operator.getitem(%3, 0)  : f32[4, 8]
return (%4,)
--- raise.aten_layer_norm=1
%0 = input('x')  : f32[4, 8]
%1 = input('w')  : f32[8]
%2 = input('b')  : f32[8]
%3 = fxsp.layer_norm.default(%0, %1, %2, 1e-05)  : f32[4, 8]
return (%3,)""",
        )


class TestRaiseVllm(expecttest.TestCase):
    def test_c_rms_norm_auto_functionalized_v2(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["vllm_c_rms_norm"], 1e-6, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = aten.empty.memory_format([4, 8], dtype=torch.bfloat16)  : bf16[4, 8]
%3 = higher_order.auto_functionalized_v2(<OpOverload(op='_C.rms_norm', overload='default')>, _all_bases=[%2], _result_base_index=0, epsilon=1e-06, input=%0, weight=%1)  : (None, bf16[4, 8])
%4 = operator.getitem(%3, 1)  : bf16[4, 8]
return (%4,)
--- raise.vllm_c_rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = fxsp.rms_norm.default(%0, %1, 1e-06)  : bf16[4, 8]
%3 = aten.empty.memory_format([4, 8], dtype=torch.bfloat16)  : bf16[4, 8]
return (%2,)""",
        )

    def test_c_rms_norm_auto_functionalized_v1(self):
        with inductor_config.patch(enable_auto_functionalized_v2=False):
            gm = spelled(NORMS["vllm_c_rms_norm"], 1e-6, BF16)
        self.assertExpectedInline(
            raised(gm),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = aten.empty.memory_format([4, 8], dtype=torch.bfloat16)  : bf16[4, 8]
%3 = higher_order.auto_functionalized(<OpOverload(op='_C.rms_norm', overload='default')>, epsilon=1e-06, input=%0, result=%2, weight=%1)  : (None, bf16[4, 8])
%4 = operator.getitem(%3, 1)  : bf16[4, 8]
return (%4,)
--- raise.vllm_c_rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = fxsp.rms_norm.default(%0, %1, 1e-06)  : bf16[4, 8]
%3 = aten.empty.memory_format([4, 8], dtype=torch.bfloat16)  : bf16[4, 8]
return (%2,)""",
        )

    def test_c_fused_add_rms_norm_v2(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["vllm_c_fused_add_rms_norm"], 1e-5, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[4, 8]
%2 = input('arg2_1')  : bf16[8]
%3 = aten.mul.Tensor(%0, 1)  : bf16[4, 8]
%4 = aten.mul.Tensor(%1, 1)  : bf16[4, 8]
%5 = higher_order.auto_functionalized_v2(<OpOverload(op='_C.fused_add_rms_norm', overload='default')>, _all_bases=[%3, %4], _input_base_index=0, _residual_base_index=1, epsilon=1e-05, weight=%2)  : (None, bf16[4, 8], bf16[4, 8])
%6 = operator.getitem(%5, 1)  : bf16[4, 8]
%7 = operator.getitem(%5, 2)  : bf16[4, 8]
return (%6, %7)
--- raise.vllm_c_fused_add_rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[4, 8]
%2 = input('arg2_1')  : bf16[8]
%3 = aten.mul.Tensor(%0, 1)  : bf16[4, 8]
%4 = aten.mul.Tensor(%1, 1)  : bf16[4, 8]
%5 = fxsp.fused_add_rms_norm.default(%3, %4, %2, 1e-05)  : (bf16[4, 8], bf16[4, 8])
%6 = operator.getitem(%5, 0)  : bf16[4, 8]
%7 = operator.getitem(%5, 1)  : bf16[4, 8]
return (%6, %7)""",
        )

    def test_c_fused_add_rms_norm_v1(self):
        with inductor_config.patch(enable_auto_functionalized_v2=False):
            gm = spelled(NORMS["vllm_c_fused_add_rms_norm"], 1e-5, BF16)
        self.assertExpectedInline(
            raised(gm),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[4, 8]
%2 = input('arg2_1')  : bf16[8]
%3 = aten.mul.Tensor(%0, 1)  : bf16[4, 8]
%4 = aten.mul.Tensor(%1, 1)  : bf16[4, 8]
%5 = higher_order.auto_functionalized(<OpOverload(op='_C.fused_add_rms_norm', overload='default')>, epsilon=1e-05, input=%3, residual=%4, weight=%2)  : (None, bf16[4, 8], bf16[4, 8])
%6 = operator.getitem(%5, 1)  : bf16[4, 8]
%7 = operator.getitem(%5, 2)  : bf16[4, 8]
return (%6, %7)
--- raise.vllm_c_fused_add_rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[4, 8]
%2 = input('arg2_1')  : bf16[8]
%3 = aten.mul.Tensor(%0, 1)  : bf16[4, 8]
%4 = aten.mul.Tensor(%1, 1)  : bf16[4, 8]
%5 = fxsp.fused_add_rms_norm.default(%3, %4, %2, 1e-05)  : (bf16[4, 8], bf16[4, 8])
%6 = operator.getitem(%5, 0)  : bf16[4, 8]
%7 = operator.getitem(%5, 1)  : bf16[4, 8]
return (%6, %7)""",
        )

    def test_ir_rms_norm(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["vllm_ir_rms_norm"], 1e-6, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = vllm_ir.rms_norm.default(%0, %1, 1e-06)  : bf16[4, 8]
return (%2,)
--- raise.vllm_ir_rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = fxsp.rms_norm.default(%0, %1, 1e-06)  : bf16[4, 8]
return (%2,)""",
        )

    def test_ir_fused_add_rms_norm(self):
        self.assertExpectedInline(
            raised(spelled(NORMS["vllm_ir_fused_add_rms_norm"], 1e-6, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[4, 8]
%2 = input('arg2_1')  : bf16[8]
%3 = vllm_ir.fused_add_rms_norm.default(%0, %1, %2, 1e-06)  : (bf16[4, 8], bf16[4, 8])
%4 = operator.getitem(%3, 0)  : bf16[4, 8]
%5 = operator.getitem(%3, 1)  : bf16[4, 8]
return (%4, %5)
--- raise.vllm_ir_fused_add_rms_norm=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[4, 8]
%2 = input('arg2_1')  : bf16[8]
%3 = fxsp.fused_add_rms_norm.default(%0, %1, %2, 1e-06)  : (bf16[4, 8], bf16[4, 8])
%4 = operator.getitem(%3, 0)  : bf16[4, 8]
%5 = operator.getitem(%3, 1)  : bf16[4, 8]
return (%4, %5)""",
        )

    def test_c_static_scaled_fp8_quant(self):
        self.assertExpectedInline(
            raised(spelled(QUANTS["vllm_c_fp8"], E4M3, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : f32[]
%2 = aten.empty.memory_format([4, 8], dtype=torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
%3 = higher_order.auto_functionalized_v2(<OpOverload(op='_C.static_scaled_fp8_quant', overload='default')>, _all_bases=[%2], _result_base_index=0, input=%0, scale=%1)  : (None, f8e4m3fn[4, 8])
%4 = operator.getitem(%3, 1)  : f8e4m3fn[4, 8]
return (%4,)
--- raise.vllm_c_static_fp8_quant=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : f32[]
%2 = fxsp.static_fp8_quant.default(%0, %1, torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
%3 = aten.empty.memory_format([4, 8], dtype=torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
return (%2,)""",
        )


class TestRaiseFp8(expecttest.TestCase):
    def test_div_e4m3fn(self):
        self.assertExpectedInline(
            raised(spelled(QUANTS["fp8_div"], E4M3, BF16)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : f32[]
%2 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%3 = aten.div.Tensor(%2, %1)  : f32[4, 8]
%4 = aten.clamp_min.default(%3, -448.0)  : f32[4, 8]
%5 = aten.clamp_max.default(%4, 448.0)  : f32[4, 8]
%6 = prims.convert_element_type.default(%5, torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
return (%6,)
--- raise.static_fp8_quant=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : f32[]
%2 = fxsp.static_fp8_quant.default(%0, %1, torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
return (%2,)""",
        )

    def test_reciprocal_e4m3fnuz(self):
        self.assertExpectedInline(
            raised(spelled(QUANTS["fp8_reciprocal"], E4M3_FNUZ)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[]
%2 = aten.reciprocal.default(%1)  : f32[]
%3 = aten.mul.Tensor(%0, %2)  : f32[4, 8]
%4 = aten.clamp_min.default(%3, -240.0)  : f32[4, 8]
%5 = aten.clamp_max.default(%4, 240.0)  : f32[4, 8]
%6 = prims.convert_element_type.default(%5, torch.float8_e4m3fnuz)  : f8e4m3fnuz[4, 8]
return (%6,)
--- raise.static_fp8_quant=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[]
%2 = fxsp.static_fp8_quant.default(%0, %1, torch.float8_e4m3fnuz)  : f8e4m3fnuz[4, 8]
return (%2,)""",
        )

    def test_one_over_scale(self):
        self.assertExpectedInline(
            raised(spelled(QUANTS["fp8_one_over"], E4M3, F16)),
            """\
%0 = input('arg0_1')  : f16[4, 8]
%1 = input('arg1_1')  : f32[]
%2 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%3 = aten.reciprocal.default(%1)  : f32[]
%4 = aten.mul.Tensor(%3, 1.0)  : f32[]
%5 = aten.mul.Tensor(%2, %4)  : f32[4, 8]
%6 = aten.clamp_min.default(%5, -448.0)  : f32[4, 8]
%7 = aten.clamp_max.default(%6, 448.0)  : f32[4, 8]
%8 = prims.convert_element_type.default(%7, torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
return (%8,)
--- raise.static_fp8_quant=1
%0 = input('arg0_1')  : f16[4, 8]
%1 = input('arg1_1')  : f32[]
%2 = fxsp.static_fp8_quant.default(%0, %1, torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
return (%2,)""",
        )

    def test_norm_then_quant(self):
        # what the SP FP8 rules look for: static_fp8_quant(rms_norm(...))
        def norm_quant(x, w, scale):
            return fp8_div(E4M3)(hf(1e-6)(x, w), scale)

        x, w = make_inputs("xw", BF16)
        self.assertExpectedInline(
            raised(capture(norm_quant, x, w, torch.tensor(0.5))),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = input('arg2_1')  : f32[]
%3 = prims.convert_element_type.default(%0, torch.float32)  : f32[4, 8]
%4 = aten.pow.Tensor_Scalar(%3, 2)  : f32[4, 8]
%5 = aten.mean.dim(%4, [-1], True)  : f32[4, 1]
%6 = aten.add.Tensor(%5, 1e-06)  : f32[4, 1]
%7 = aten.rsqrt.default(%6)  : f32[4, 1]
%8 = aten.mul.Tensor(%3, %7)  : f32[4, 8]
%9 = prims.convert_element_type.default(%8, torch.bfloat16)  : bf16[4, 8]
%10 = aten.mul.Tensor(%1, %9)  : bf16[4, 8]
%11 = prims.convert_element_type.default(%10, torch.float32)  : f32[4, 8]
%12 = aten.div.Tensor(%11, %2)  : f32[4, 8]
%13 = aten.clamp_min.default(%12, -448.0)  : f32[4, 8]
%14 = aten.clamp_max.default(%13, 448.0)  : f32[4, 8]
%15 = prims.convert_element_type.default(%14, torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
return (%15,)
--- raise.rms_norm=1, raise.static_fp8_quant=1
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[8]
%2 = input('arg2_1')  : f32[]
%3 = fxsp.rms_norm.default(%0, %1, 1e-06)  : bf16[4, 8]
%4 = fxsp.static_fp8_quant.default(%3, %2, torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
return (%4,)""",
        )


@pytest.mark.usefixtures("world_of_one")
class TestRaiseCollectives(expecttest.TestCase):
    def test_functional_all_reduce(self):
        self.assertExpectedInline(
            raised(spelled(COLLECTIVES["funcol_all_reduce"], dist.group.WORLD)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8, 8]
%2 = aten.mm.default(%0, %1)  : f32[4, 8]
%3 = _c10d_functional.all_reduce.default(%2, 'sum', G0)  : f32[4, 8]
%4 = _c10d_functional.wait_tensor.default(%3)  : f32[4, 8]
%5 = aten.add.Tensor(%4, 1)  : f32[4, 8]
return (%5,)
--- raise.c10d_all_reduce=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8, 8]
%2 = aten.mm.default(%0, %1)  : f32[4, 8]
%3 = fxsp.all_reduce.default(%2, G0, 'c10d')  : f32[4, 8]
%4 = aten.add.Tensor(%3, 1)  : f32[4, 8]
return (%4,)""",
        )

    def test_in_place_dist_all_reduce(self):
        self.assertExpectedInline(
            raised(spelled(COLLECTIVES["dist_all_reduce"], dist.group.WORLD)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8, 8]
%2 = aten.mm.default(%0, %1)  : f32[4, 8]
%3 = _c10d_functional.all_reduce.default(%2, 'sum', G0)  : f32[4, 8]
%4 = _c10d_functional.wait_tensor.default(%3)  : f32[4, 8]
%5 = aten.add.Tensor(%4, 1)  : f32[4, 8]
return (%5,)
--- raise.c10d_all_reduce=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8, 8]
%2 = aten.mm.default(%0, %1)  : f32[4, 8]
%3 = fxsp.all_reduce.default(%2, G0, 'c10d')  : f32[4, 8]
%4 = aten.add.Tensor(%3, 1)  : f32[4, 8]
return (%4,)""",
        )

    def test_vllm_all_reduce(self):
        self.assertExpectedInline(
            raised(spelled(COLLECTIVES["vllm_all_reduce"], dist.group.WORLD)),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8, 8]
%2 = aten.mm.default(%0, %1)  : f32[4, 8]
%3 = vllm.all_reduce.default(%2, G0)  : f32[4, 8]
%4 = aten.add.Tensor(%3, 1)  : f32[4, 8]
return (%4,)
--- raise.vllm_all_reduce=1
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8, 8]
%2 = aten.mm.default(%0, %1)  : f32[4, 8]
%3 = fxsp.all_reduce.default(%2, G0, 'vllm')  : f32[4, 8]
%4 = aten.add.Tensor(%3, 1)  : f32[4, 8]
return (%4,)""",
        )


# ---------------------------------------------------------------------------------------------
# Look-alikes: never raised, and the report says why
# ---------------------------------------------------------------------------------------------


def _centred(x):
    xf = x.float()
    return xf - xf.mean(-1, keepdim=True)


LOOK_ALIKES = {
    # name: (fn, inputs, dtype, text the explanation must contain)
    # LayerNorm look-alikes: an unbiased variance, eps after the rsqrt, statistics over rows
    "layer_norm_unbiased_variance": (
        lambda x, w: w * (_centred(x) * torch.rsqrt(x.var(-1, keepdim=True) + 1e-5)),
        "xw",
        F32,
        "the variance has correction=1, a LayerNorm's has 0",
    ),
    "layer_norm_eps_after_rsqrt": (
        lambda x, w: w * (_centred(x) * (torch.rsqrt(_centred(x).pow(2).mean(-1, True)) + 1e-5)),
        "xw",
        F32,
        "expected aten.rsqrt.default, got aten.add.Tensor",
    ),
    "layer_norm_over_rows": (
        lambda x: (
            (x - x.mean(0, True)) * torch.rsqrt(x.var(0, keepdim=True, unbiased=False) + 1e-5)
        ),
        "x",
        F32,
        "expected dims [-1], got [0]",
    ),
    "eps_after_rsqrt": (
        lambda x, w: w * (x * (torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) + 1e-6)),
        "xw",
        F32,
        "expected aten.rsqrt.default, got aten.add.Tensor",
    ),
    "norm_over_rows": (
        lambda x: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6),
        "x",
        F32,
        "expected dims [-1], got [0]",
    ),
    "norm_computed_in_bf16": (
        lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
        "xw",
        BF16,
        "expected tensor x of dtype in {torch.float32}",
    ),
    "result_left_in_fp32": (
        lambda x, w: normed(x, 1e-6) * w.float(),
        "xw",
        BF16,
        "the fp32 result of a bfloat16 norm is never cast back to bfloat16",
    ),
    "cast_to_another_dtype": (
        lambda x: normed(x, 1e-6).to(BF16),
        "x",
        F16,
        "the result is cast to bfloat16, not to the input's float16",
    ),
    "fp8_clamp_not_the_dtype_range": (
        lambda x, s: (x.float() / s).clamp(-240.0, 240.0).to(E4M3),
        "xs",
        F32,
        "clamp to [-240.0, 240.0] is not torch.float8_e4m3fn's range ±448.0",
    ),
    "fp8_quotient_in_bf16": (
        lambda x, s: (x / s).clamp(-448.0, 448.0).to(E4M3),
        "xs",
        BF16,
        "expected aten.div.Tensor, got prims.convert_element_type.default",
    ),
    "vllm_c_fp8_fnuz": (
        vllm_c_fp8(E4M3_FNUZ),
        "xs",
        BF16,
        "result buffer of dtype torch.float8_e4m3fnuz: vLLM's fnuz kernels clamp at 224",
    ),
}


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
def test_look_alike_is_not_raised(name):
    fn, kind, dtype, reason = LOOK_ALIKES[name]
    gm = capture(fn, *make_inputs(kind, dtype))
    before = fxsp.golden(gm)
    reports = raise_ir(gm)
    assert counts(reports) == {}
    assert fxsp.golden(gm) == before
    assert reason in explain(reports), explain(reports)


@pytest.mark.parametrize("reduce_op", ["avg", "max"])
def test_non_sum_all_reduce_is_not_raised(reduce_op, world_of_one):
    gm = capture(
        lambda x: funcol.all_reduce(x, reduce_op, dist.group.WORLD) + 1, make_inputs("x")[0]
    )
    reports = raise_ir(gm)
    assert counts(reports) == {}
    assert f"expected 'sum', got '{reduce_op}'" in explain(reports)


def test_a_multiply_per_row_is_no_weight():
    # the norm is raised, the multiply stays outside it
    gm = capture(lambda x, w: w[:, None] * normed(x, 1e-6), make_inputs("x")[0], torch.ones(4))
    reports = raise_ir(gm)
    assert counts(reports) == {"raise.rms_norm_unweighted": 1}
    assert "weight of shape [4, 1] is not one value per feature (8)" in explain(reports)


def test_training_graph_keeps_the_saved_rsqrt():
    # with autograd the rsqrt is saved for backward: an interior value used outside
    module = nn.RMSNorm(H, eps=1e-6)
    spy = Capture()
    torch._dynamo.reset()
    with (
        inductor_config.patch(post_grad_custom_pre_pass=spy, fx_graph_cache=False),
        pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="_Captured"),
    ):
        torch.compile(module, backend="inductor")(make_inputs("x")[0].requires_grad_())
    reports = raise_ir(spy.gm)
    assert counts(reports) == {}
    assert "also used by output" in explain(reports)
