"""raise → lower computes what the graph computed: every spelling, fp32/bf16/fp16, several eps,
random inputs (and random shapes with hypothesis). Then the lowering itself: its golden text,
provider kernels, and that lowering then raising again gives the IR back."""

from __future__ import annotations

import copy

import expecttest
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx import GraphModule

import fxsp
from fxsp.ir import lower_ir, raise_ir
from fxsp.ir.ops import FUSED_ADD_RMS_NORM, IR_OPS, RMS_NORM
from fxsp.ir.providers import Provider, register_provider, unregister_provider
from tests.support import (
    BF16,
    COLLECTIVES,
    E4M3,
    E4M3_FNUZ,
    F16,
    F32,
    NORMS,
    QUANTS,
    capture,
    counts,
    fused_rms_norm_graph,
    make_inputs,
)

DTYPES = [F32, BF16, F16]
EPS = [1e-5, 1e-6, 1e-8, 0.1]


def raise_and_lower(gm: GraphModule, providers: tuple | None = ()) -> tuple[GraphModule, dict]:
    """A copy of `gm`, raised and lowered (reference decompositions unless `providers`), checked
    for what every lowered graph must be: valid, free of IR ops, with a value on every node."""
    new = copy.deepcopy(gm)
    fired = counts(raise_ir(new, check=True))
    lower_ir(new, providers)
    new.graph.lint()
    new.recompile()
    assert not [n for n in new.graph.nodes if n.op == "call_function" and n.target in IR_OPS]
    assert all("val" in n.meta for n in new.graph.nodes if n.op == "call_function"), fxsp.golden(
        new
    )
    return new, fired


def assert_same_values(
    original: GraphModule, lowered: GraphModule, args: tuple, rtol: float, atol: float
):
    for want, got in zip(original(*args), lowered(*args), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def ulps(dtype: torch.dtype) -> dict:
    """Tolerance: none. Raising records each spelling and lowering emits it again."""
    return {"rtol": 0, "atol": 0}


# ---------------------------------------------------------------------------------------------
# Norms: every spelling × dtype × eps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_spelling_keeps_its_values(name, dtype, eps):
    spelling = NORMS[name]
    args = make_inputs(spelling.inputs, dtype, rows=5)
    original = capture(spelling.build(eps), *args)
    lowered, fired = raise_and_lower(original)
    assert fired.get(spelling.rule, 0) >= 1, fired
    assert_same_values(original, lowered, args, **ulps(dtype))


@pytest.mark.parametrize("eps", [None, *EPS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_undecomposed_fused_rms_norm_keeps_its_values(dtype, eps):
    args = make_inputs("xw", dtype, rows=5, hidden=16)
    original = fused_rms_norm_graph(*args, eps)
    lowered, fired = raise_and_lower(original)
    assert fired == {"raise.aten_rms_norm": 1}
    assert_same_values(original, lowered, args, **ulps(dtype))


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(["hf", "hf_down_after", "torch_rms_norm", "add_norm"]),
    dtype=st.sampled_from(DTYPES),
    leading=st.lists(st.integers(1, 5), min_size=1, max_size=2),  # [T, H] or [B, S, H]
    hidden=st.integers(1, 64),
    eps=st.floats(1e-9, 1.0),
    seed=st.integers(0, 2**16),
)
def test_norms_on_random_shapes(name, dtype, leading, hidden, eps, seed):
    spelling = NORMS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    args = (
        (x, w) if spelling.inputs == "xw" else (x, torch.randn(x.shape, generator=g).to(dtype), w)
    )
    original = capture(spelling.build(eps), *args)
    lowered, fired = raise_and_lower(original)
    assert fired.get(spelling.rule, 0) >= 1, fired
    assert_same_values(original, lowered, args, **ulps(dtype))


# ---------------------------------------------------------------------------------------------
# FP8 quant and collectives
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [E4M3, E4M3_FNUZ], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(QUANTS))
def test_fp8_spelling_keeps_its_values(name, dtype, fp8):
    if name == "vllm_c_fp8" and fp8 == E4M3_FNUZ:
        pytest.skip("not raised: vLLM's fnuz kernels clamp at 224 (a look-alike test)")
    spelling = QUANTS[name]
    args = make_inputs(spelling.inputs, dtype, rows=8, hidden=32)
    original = capture(spelling.build(fp8), *args)
    lowered, fired = raise_and_lower(original)
    assert fired == {spelling.rule: 1}
    (want,), (got,) = original(*args), lowered(*args)
    assert got.dtype == fp8
    assert want.float().abs().max() == torch.finfo(fp8).max  # some values were clamped
    assert torch.equal(got.float(), want.float())  # each spelling lowered as it was written


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("name", sorted(COLLECTIVES))
@pytest.mark.usefixtures("world_of_one")
def test_collective_spelling_keeps_its_values(name, dtype):
    spelling = COLLECTIVES[name]
    args = make_inputs(spelling.inputs, dtype)
    original = capture(spelling.build(dist.group.WORLD), *args)
    lowered, fired = raise_and_lower(original)
    assert fired == {spelling.rule: 1}
    assert_same_values(original, lowered, args, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Lowering
# ---------------------------------------------------------------------------------------------


def lowered_text(gm: GraphModule) -> str:
    raise_ir(gm, check=True)
    raised = fxsp.golden(gm)
    lower_ir(gm)
    return f"{raised}\n--- lowered\n{fxsp.golden(gm)}"


class TestLoweringGolden(expecttest.TestCase):
    def test_fused_add_rms_norm_then_fp8(self):
        # the reference decomposition, spelled as Inductor's post-grad graphs are
        def block(x, residual, w, scale):
            out, h = NORMS["add_norm"].build(1e-6)(x, residual, w)
            return QUANTS["fp8_div"].build(E4M3)(out, scale), h

        args = (*make_inputs("xrw", BF16), torch.tensor(0.5))
        self.assertExpectedInline(
            lowered_text(capture(block, *args)),
            """\
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[4, 8]
%2 = input('arg2_1')  : bf16[8]
%3 = input('arg3_1')  : f32[]
%4 = fxsp.fused_add_rms_norm.default(%0, %1, %2, 1e-06)  : (bf16[4, 8], bf16[4, 8])
%5 = operator.getitem(%4, 0)  : bf16[4, 8]
%6 = fxsp.static_fp8_quant.default(%5, %3, torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
%7 = operator.getitem(%4, 1)  : bf16[4, 8]
return (%6, %7)
--- lowered
%0 = input('arg0_1')  : bf16[4, 8]
%1 = input('arg1_1')  : bf16[4, 8]
%2 = input('arg2_1')  : bf16[8]
%3 = input('arg3_1')  : f32[]
%4 = aten.add.Tensor(%0, %1)  : bf16[4, 8]
%5 = prims.convert_element_type.default(%4, torch.float32)  : f32[4, 8]
%6 = aten.pow.Tensor_Scalar(%5, 2)  : f32[4, 8]
%7 = aten.mean.dim(%6, [-1], True)  : f32[4, 1]
%8 = aten.add.Tensor(%7, 1e-06)  : f32[4, 1]
%9 = aten.rsqrt.default(%8)  : f32[4, 1]
%10 = aten.mul.Tensor(%5, %9)  : f32[4, 8]
%11 = prims.convert_element_type.default(%10, torch.bfloat16)  : bf16[4, 8]
%12 = aten.mul.Tensor(%11, %2)  : bf16[4, 8]
%13 = prims.convert_element_type.default(%12, torch.float32)  : f32[4, 8]
%14 = aten.div.Tensor(%13, %3)  : f32[4, 8]
%15 = aten.clamp_min.default(%14, -448.0)  : f32[4, 8]
%16 = aten.clamp_max.default(%15, 448.0)  : f32[4, 8]
%17 = prims.convert_element_type.default(%16, torch.float8_e4m3fn)  : f8e4m3fn[4, 8]
return (%17, %4)""",
        )

    def test_all_reduce_flavors(self):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:

            def both(x, w):
                y = COLLECTIVES["funcol_all_reduce"].build(dist.group.WORLD)(x, w)
                return COLLECTIVES["vllm_all_reduce"].build(dist.group.WORLD)(y, w)

            gm = capture(both, *make_inputs("xm"))
        finally:
            dist.destroy_process_group()
        self.assertExpectedInline(
            lowered_text(gm),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8, 8]
%2 = aten.mm.default(%0, %1)  : f32[4, 8]
%3 = fxsp.all_reduce.default(%2, G0, 'c10d')  : f32[4, 8]
%4 = aten.add.Tensor(%3, 1)  : f32[4, 8]
%5 = aten.mm.default(%4, %1)  : f32[4, 8]
%6 = fxsp.all_reduce.default(%5, G0, 'vllm')  : f32[4, 8]
%7 = aten.add.Tensor(%6, 1)  : f32[4, 8]
return (%7,)
--- lowered
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8, 8]
%2 = aten.mm.default(%0, %1)  : f32[4, 8]
%3 = _c10d_functional.all_reduce.default(%2, 'sum', G0)  : f32[4, 8]
%4 = _c10d_functional.wait_tensor.default(%3)  : f32[4, 8]
%5 = aten.add.Tensor(%4, 1)  : f32[4, 8]
%6 = aten.mm.default(%5, %1)  : f32[4, 8]
%7 = vllm.all_reduce.default(%6, G0)  : f32[4, 8]
%8 = aten.add.Tensor(%7, 1)  : f32[4, 8]
return (%8,)""",
        )


def test_lowering_then_raising_gives_the_ir_back():
    def block(x, residual, w, scale):
        out, h = NORMS["add_norm"].build(1e-5)(x, residual, w)
        normed = NORMS["torch_rms_norm_no_weight"].build(0.1)(h)
        return QUANTS["fp8_reciprocal"].build(E4M3_FNUZ)(out, scale), normed

    gm = capture(block, *make_inputs("xrw", F16), torch.tensor(0.5))
    raise_ir(gm)
    raised = fxsp.golden(gm)
    lower_ir(gm)
    raise_ir(gm)
    assert fxsp.golden(gm) == raised


def _rms_norm_kernel(x, weight, eps):
    return torch.ops.fxsp.rms_norm.default(x, weight, eps) * 1  # a "kernel": same values


@pytest.fixture
def test_provider():
    lib = torch.library.Library("fxsp_test_provider", "FRAGMENT")  # noqa: TOR901
    lib.define("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor")
    lib.impl("rms_norm", _rms_norm_kernel, "CompositeExplicitAutograd")
    kernel = torch.ops.fxsp_test_provider.rms_norm.default
    register_provider(
        Provider("test", {RMS_NORM: kernel}, frozenset({"cpu"}), frozenset({BF16}), priority=5)
    )
    yield kernel
    unregister_provider("test")


def test_provider_kernel_replaces_the_target(test_provider):
    def two(x, residual, w):
        return NORMS["hf"].build(1e-6)(x, w), NORMS["vllm_ir_fused_add_rms_norm"].build(1e-6)(
            x, residual, w
        )

    args = make_inputs("xrw", BF16)
    gm = capture(two, *args)
    raise_ir(gm)
    # reference only; vLLM's op stays vLLM's (vLLM picks its kernel)
    assert lower_ir(copy.deepcopy(gm), providers=()) == {"aten": 1, "vllm_ir": 1}
    lowered = copy.deepcopy(gm)
    assert lower_ir(lowered) == {"test": 1, "vllm_ir": 1}
    kernels = [n for n in lowered.graph.nodes if n.target is test_provider]
    assert len(kernels) == 1 and kernels[0].meta["val"].dtype == BF16
    assert not [n for n in lowered.graph.nodes if n.target is FUSED_ADD_RMS_NORM]
    original = capture(two, *args)
    assert_same_values(original, lowered, args, **ulps(BF16))


def test_provider_serves_only_its_dtypes(test_provider):
    gm = capture(NORMS["hf"].build(1e-6), *make_inputs("xw", F32))
    raise_ir(gm)
    assert lower_ir(gm) == {"aten": 1}


# ---------------------------------------------------------------------------------------------
# vLLM's fused norm + FP8 quant (what its fuse_norm_quant pass leaves for fxsp)
# ---------------------------------------------------------------------------------------------


def vllm_c_norm_quant(x, w, scale):
    out = torch.empty(x.shape, dtype=E4M3)
    torch.ops._C.rms_norm_static_fp8_quant(out, x * 1, w, scale, 1e-6)
    return out


def vllm_c_fused_add_norm_quant(x, residual, w, scale):
    x, residual = x * 1, residual * 1  # intermediates, as in a model
    out = torch.empty(x.shape, dtype=E4M3)
    torch.ops._C.fused_add_rms_norm_static_fp8_quant(out, x, residual, w, scale, 1e-6)
    return out, residual


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "fn", [vllm_c_norm_quant, vllm_c_fused_add_norm_quant], ids=lambda f: f.__name__
)
def test_vllm_fused_norm_quant_is_raised_and_keeps_its_values(fn, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, residual = (
        (10 * torch.randn(8, 16, generator=g)).to(dtype),
        torch.randn(8, 16, generator=g).to(dtype),
    )
    w, scale = (1 + 0.1 * torch.randn(16, generator=g)).to(dtype), torch.tensor([0.004])
    args = (x, residual, w, scale) if fn is vllm_c_fused_add_norm_quant else (x, w, scale)
    original = capture(fn, *args)
    lowered, fired = raise_and_lower(original)
    rule = "raise.vllm_c_" + ("fused_add_" if len(args) == 4 else "") + "rms_norm_static_fp8_quant"
    assert fired == {rule: 1}
    for want, got in zip(original(*args), lowered(*args), strict=True):
        assert got.dtype == want.dtype and torch.equal(got.float(), want.float())
    assert original(*args)[0].float().abs().max() == 448  # some values were clamped
