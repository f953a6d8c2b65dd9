"""The Triton norm kernels against the references in ops.py, and the GPU providers' gating.

Without CUDA the kernels run in Triton's interpreter, which must be switched on before Triton is
first imported. Run alone, this module does that itself. In a longer run an earlier test may
already have imported Triton (Inductor does); then `test_kernels_in_a_fresh_process` reruns this
file in a new process and the in-process kernel tests skip. With CUDA everything runs natively.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from fxsp.ir import ops, providers
from fxsp.ir.kernels import flashinfer as flashinfer_provider
from fxsp.ir.kernels import load_gpu_providers
from fxsp.ir.kernels import triton as triton_kernels
from fxsp.ir.ops import FP8_DTYPES, FUSED_ADD_RMS_NORM, RMS_NORM, STATIC_FP8_QUANT

REPO = Path(__file__).resolve().parent.parent
fxsp_triton = torch.ops.fxsp_triton


def _kernels_run_here() -> bool:
    try:
        fxsp_triton.rms_norm(torch.ones(1, 4, device=DEVICE), None, 1e-6)
    except Exception:  # noqa: BLE001 - any failure means: not in this process
        return False
    return True


KERNELS_RUN_HERE = _kernels_run_here()
needs_kernels = pytest.mark.skipif(
    not KERNELS_RUN_HERE,
    reason="Triton was imported before TRITON_INTERPRET=1 could be set; "
    "test_kernels_in_a_fresh_process runs these",
)


def _inputs(rows, hidden, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return (3 * torch.randn(*shape, generator=generator)).to(dtype).to(DEVICE)

    return randn(rows, hidden), randn(rows, hidden), randn(hidden)


def _assert_close_to_reference(actual, expected, rounded_to=None):
    """Equal up to the order of the fp32 sum of squares: a few ulps of the dtype the normalised
    row is rounded to (`rounded_to`, by default the output's)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rounded_to = rounded_to or expected.dtype
    ulp = torch.finfo(rounded_to).eps
    rtol = 8 * ulp if rounded_to == torch.float32 else 2 * ulp
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-6)


def _assert_fp8_close(actual, expected):
    """FP8 results whose inputs may differ by an ulp: at most one FP8 step apart."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=2**-3, atol=torch.finfo(expected.dtype).tiny
    )


def _fp8_bits(t):
    return t.view(torch.uint8)


def test_custom_ops_have_the_ir_signatures():
    for name in ("rms_norm", "fused_add_rms_norm"):
        ir_schema = str(getattr(torch.ops.fxsp, name).default._schema)
        assert str(getattr(fxsp_triton, name).default._schema) == ir_schema.replace(
            "fxsp::", "fxsp_triton::"
        )
        assert str(getattr(torch.ops.fxsp_flashinfer, name).default._schema) == ir_schema.replace(
            "fxsp::", "fxsp_flashinfer::"
        )
    for name in ("layer_norm", "fused_add_layer_norm"):
        ir_schema = str(getattr(torch.ops.fxsp, name).default._schema)
        assert str(getattr(fxsp_triton, name).default._schema) == ir_schema.replace(
            "fxsp::", "fxsp_triton::"
        )
    assert str(fxsp_triton.rms_norm_static_fp8_quant.default._schema) == (
        "fxsp_triton::rms_norm_static_fp8_quant(Tensor x, Tensor? weight, float eps, "
        "Tensor scale, ScalarType fp8_dtype) -> Tensor"
    )
    assert str(fxsp_triton.fused_add_rms_norm_static_fp8_quant.default._schema) == (
        "fxsp_triton::fused_add_rms_norm_static_fp8_quant(Tensor x, Tensor residual, "
        "Tensor? weight, float eps, Tensor scale, ScalarType fp8_dtype) -> (Tensor, Tensor)"
    )


# --- Kernels against the references --------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [96, 1000])
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("with_weight", [True, False])
def test_norms_match_reference(dtype, hidden, rows, with_weight):
    x, residual, weight = _inputs(rows, hidden, dtype)
    weight = weight if with_weight else None

    _assert_close_to_reference(
        fxsp_triton.rms_norm(x, weight, 1e-6), ops.rms_norm_reference(x, weight, 1e-6)
    )

    out, residual_out = fxsp_triton.fused_add_rms_norm(x, residual, weight, 1e-6)
    expected_out, expected_residual_out = ops.fused_add_rms_norm_reference(
        x, residual, weight, 1e-6
    )
    assert torch.equal(residual_out, expected_residual_out)  # one rounded add: exact
    _assert_close_to_reference(out, expected_out)


@needs_kernels
@pytest.mark.parametrize("hidden", [1, 8, 4096])
def test_norm_of_other_row_lengths(hidden):
    x, residual, weight = _inputs(2, hidden, torch.bfloat16, seed=1)
    out, residual_out = fxsp_triton.fused_add_rms_norm(x, residual, weight, 1e-5)
    expected_out, expected_residual_out = ops.fused_add_rms_norm_reference(
        x, residual, weight, 1e-5
    )
    assert torch.equal(residual_out, expected_residual_out)
    _assert_close_to_reference(out, expected_out)


@needs_kernels
@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-5, 0.5])
def test_eps(eps):
    x, _, weight = _inputs(3, 96, torch.float32, seed=2)
    x = x * 1e-3  # small enough that a large eps matters
    _assert_close_to_reference(
        fxsp_triton.rms_norm(x, weight, eps), ops.rms_norm_reference(x, weight, eps)
    )


@needs_kernels
@pytest.mark.parametrize(
    "x_dtype, residual_dtype, weight_dtype",
    [
        (torch.bfloat16, torch.bfloat16, torch.float32),  # result in fp32
        (torch.float32, torch.float32, torch.bfloat16),
        (torch.float16, torch.float16, torch.bfloat16),  # promotes to fp32
        (torch.bfloat16, torch.float32, torch.bfloat16),  # residual_out in fp32
    ],
)
def test_mixed_dtypes_promote_like_the_reference(x_dtype, residual_dtype, weight_dtype):
    x = _inputs(3, 96, x_dtype)[0]
    residual = _inputs(3, 96, residual_dtype, seed=1)[1]
    weight = _inputs(3, 96, weight_dtype, seed=2)[2]
    out, residual_out = fxsp_triton.fused_add_rms_norm(x, residual, weight, 1e-6)
    expected_out, expected_residual_out = ops.fused_add_rms_norm_reference(
        x, residual, weight, 1e-6
    )
    assert torch.equal(residual_out, expected_residual_out)
    _assert_close_to_reference(out, expected_out, rounded_to=residual_out.dtype)


@needs_kernels
def test_any_leading_shape_and_no_rows():
    x, residual, weight = _inputs(6, 96, torch.bfloat16)
    x3, residual3 = x.reshape(2, 3, 96), residual.reshape(2, 3, 96)
    out, residual_out = fxsp_triton.fused_add_rms_norm(x3, residual3, weight, 1e-6)
    assert out.shape == residual_out.shape == (2, 3, 96)
    assert torch.equal(
        out.reshape(6, 96), fxsp_triton.fused_add_rms_norm(x, residual, weight, 1e-6)[0]
    )
    # A non-contiguous input gives the same rows.
    assert torch.equal(
        fxsp_triton.rms_norm(x.t().contiguous().t(), weight, 1e-6),
        fxsp_triton.rms_norm(x, weight, 1e-6),
    )

    empty = x[:0]
    out, residual_out = fxsp_triton.fused_add_rms_norm(empty, empty, weight, 1e-6)
    assert out.shape == residual_out.shape == (0, 96)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [1, 96, 1000])
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("affine", ["weight and bias", "weight", "neither"])
def test_layer_norms_match_reference(dtype, hidden, rows, affine):
    """LayerNorm: the mean and the variance in fp32 (two reductions here, Welford's in the
    reference's compiled form), one rounding at the end: a few ulps of the dtype."""
    x, residual, weight = _inputs(rows, hidden, dtype)
    bias = weight.flip(0) / 3 if affine == "weight and bias" else None
    weight = None if affine == "neither" else weight
    _assert_close_to_reference(
        fxsp_triton.layer_norm(x, weight, bias, 1e-5),
        ops.layer_norm_reference(x, weight, bias, 1e-5),
    )
    out, residual_out = fxsp_triton.fused_add_layer_norm(x, residual, weight, bias, 1e-5)
    expected_out, expected_residual_out = ops.fused_add_layer_norm_reference(
        x, residual, weight, bias, 1e-5
    )
    assert torch.equal(residual_out, expected_residual_out)  # one rounded add: exact
    _assert_close_to_reference(out, expected_out)


@needs_kernels
@pytest.mark.parametrize("hidden, block", [(96, 32), (1000, 256)])
def test_layer_norm_rows_longer_than_one_pass(monkeypatch, hidden, block):
    """Rows above MAX_SINGLE_PASS_COLS are read three times in blocks."""
    monkeypatch.setattr(triton_kernels, "MAX_SINGLE_PASS_COLS", 64)
    monkeypatch.setattr(triton_kernels, "MULTI_PASS_BLOCK", block)
    x, residual, weight = _inputs(3, hidden, torch.bfloat16)
    out, residual_out = fxsp_triton.fused_add_layer_norm(x, residual, weight, weight / 2, 1e-5)
    expected_out, expected_residual_out = ops.fused_add_layer_norm_reference(
        x, residual, weight, weight / 2, 1e-5
    )
    assert torch.equal(residual_out, expected_residual_out)
    _assert_close_to_reference(out, expected_out)


@needs_kernels
@pytest.mark.parametrize("hidden, block", [(96, 32), (1000, 256)])
def test_rows_longer_than_one_pass(monkeypatch, hidden, block):
    """Rows above MAX_SINGLE_PASS_COLS are read twice in blocks; shrink both to reach that path."""
    monkeypatch.setattr(triton_kernels, "MAX_SINGLE_PASS_COLS", 64)
    monkeypatch.setattr(triton_kernels, "MULTI_PASS_BLOCK", block)
    x, residual, weight = _inputs(3, hidden, torch.bfloat16)
    out, residual_out = fxsp_triton.fused_add_rms_norm(x, residual, weight, 1e-6)
    expected_out, expected_residual_out = ops.fused_add_rms_norm_reference(
        x, residual, weight, 1e-6
    )
    assert torch.equal(residual_out, expected_residual_out)
    _assert_close_to_reference(out, expected_out)

    scale = torch.tensor(0.05, device=DEVICE)
    quantized = fxsp_triton.rms_norm_static_fp8_quant(x, weight, 1e-6, scale, torch.float8_e4m3fn)
    assert torch.equal(
        _fp8_bits(quantized),
        _fp8_bits(
            ops.static_fp8_quant_reference(
                fxsp_triton.rms_norm(x, weight, 1e-6), scale, torch.float8_e4m3fn
            )
        ),
    )


# --- Static FP8 quant forms ----------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_weight", [True, False])
def test_quant_forms_match_reference(fp8_dtype, dtype, with_weight):
    x, residual, weight = _inputs(3, 1000, dtype)
    weight = weight if with_weight else None
    scale = torch.tensor(0.02, device=DEVICE)  # saturates the largest values

    quantized = fxsp_triton.rms_norm_static_fp8_quant(x, weight, 1e-6, scale, fp8_dtype)
    # Against the reference quant of the kernel's own norm the bytes are exact ...
    assert torch.equal(
        _fp8_bits(quantized),
        _fp8_bits(
            ops.static_fp8_quant_reference(fxsp_triton.rms_norm(x, weight, 1e-6), scale, fp8_dtype)
        ),
    )
    # ... against the full reference, an ulp in the norm may move a value one FP8 step.
    _assert_fp8_close(
        quantized,
        ops.static_fp8_quant_reference(ops.rms_norm_reference(x, weight, 1e-6), scale, fp8_dtype),
    )

    quantized, residual_out = fxsp_triton.fused_add_rms_norm_static_fp8_quant(
        x, residual, weight, 1e-6, scale, fp8_dtype
    )
    out, expected_residual_out = fxsp_triton.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(residual_out, expected_residual_out)
    assert torch.equal(
        _fp8_bits(quantized), _fp8_bits(ops.static_fp8_quant_reference(out, scale, fp8_dtype))
    )
    reference_out, reference_residual_out = ops.fused_add_rms_norm_reference(
        x, residual, weight, 1e-6
    )
    assert torch.equal(residual_out, reference_residual_out)
    _assert_fp8_close(quantized, ops.static_fp8_quant_reference(reference_out, scale, fp8_dtype))


def _fp8_rounding_cases(fp8_dtype):
    """Every finite FP8 value, the midpoints between neighbours (ties) and the fp32 values just
    beside them, values beyond the range or below the smallest subnormal, zeros, infs, NaNs."""
    values = torch.arange(256, dtype=torch.uint8).view(fp8_dtype).float()
    finite = values[values.isfinite()].unique()
    midpoints = (finite[1:] + finite[:-1]) / 2
    inf = torch.tensor(float("inf"))
    bound, tiny = ops.fp8_max(fp8_dtype), float(finite[finite > 0].min())
    special = torch.tensor(
        [
            bound * 1.01,
            bound + 8,
            1e30,
            float("inf"),
            0.0,
            float("nan"),
            1e-30,
            tiny / 2,
            tiny / 2 * 1.001,
            tiny * 1.5,
            tiny * 2.5,
        ]
    )
    spread = torch.randn(2000, generator=torch.Generator().manual_seed(3)) * torch.exp(
        torch.randn(2000, generator=torch.Generator().manual_seed(4)) * 4
    )
    return torch.cat(
        [
            finite,
            midpoints,
            torch.nextafter(midpoints, inf),
            torch.nextafter(midpoints, -inf),
            special,
            -special,
            spread,
        ]
    )


@needs_kernels
@pytest.mark.parametrize("fp8_dtype", FP8_DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_fp8_rounding_is_exact(fp8_dtype, scale):
    """A row of ones with eps 0 normalises to exactly 1, so the output is the weight: the
    weight feeds chosen values straight into the FP8 rounding."""
    values = _fp8_rounding_cases(fp8_dtype).to(DEVICE)
    ones = torch.ones(1, values.numel(), device=DEVICE)
    scale = torch.tensor(scale, device=DEVICE)
    quantized = fxsp_triton.rms_norm_static_fp8_quant(ones, values, 0.0, scale, fp8_dtype)
    expected = ops.static_fp8_quant_reference(values, scale, fp8_dtype)
    assert torch.equal(fxsp_triton.rms_norm(ones, values, 0.0)[0].nan_to_num(), values.nan_to_num())
    # NaN's sign bit is not meaningful (e4m3fn has two NaNs): only NaN-ness is compared.
    assert torch.equal(quantized[0].float().isnan(), expected.float().isnan())
    numbers = ~expected.float().isnan()
    actual_bits, expected_bits = _fp8_bits(quantized[0])[numbers], _fp8_bits(expected)[numbers]
    mismatches = (actual_bits != expected_bits).nonzero().flatten()
    assert mismatches.numel() == 0, (
        values[numbers][mismatches][:8].tolist(),
        actual_bits[mismatches][:8].tolist(),
        expected_bits[mismatches][:8].tolist(),
    )


# --- Tracing and Inductor ------------------------------------------------------------------


def test_fake_impls_give_the_real_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def calls(x, residual, weight, scale):
        return [
            fxsp_triton.rms_norm(x, weight, 1e-6),
            fxsp_triton.rms_norm(x, None, 1e-6),
            *fxsp_triton.fused_add_rms_norm(x, residual, weight, 1e-6),
            fxsp_triton.rms_norm_static_fp8_quant(x, weight, 1e-6, scale, torch.float8_e4m3fnuz),
            *fxsp_triton.fused_add_rms_norm_static_fp8_quant(
                x, residual, None, 1e-6, scale, torch.float8_e4m3fn
            ),
            torch.ops.fxsp_flashinfer.rms_norm(x, weight, 1e-6),
            *torch.ops.fxsp_flashinfer.fused_add_rms_norm(x, residual, weight, 1e-6),
        ]

    def make_args():
        return (
            torch.ones(2, 3, 8, dtype=torch.bfloat16, device=DEVICE),
            torch.ones(2, 3, 8, dtype=torch.float32, device=DEVICE),
            torch.ones(8, dtype=torch.float16, device=DEVICE),
            torch.ones((), device=DEVICE),
        )

    with FakeTensorMode():
        fake = [(t.shape, t.dtype) for t in calls(*make_args())]
    assert fake[2:4] == [((2, 3, 8), torch.float32)] * 2  # residual promoted bf16 + fp32
    if KERNELS_RUN_HERE:
        assert fake == [(t.shape, t.dtype) for t in calls(*make_args())]


@needs_kernels
def test_inductor_compiles_a_graph_calling_the_op():
    """Natively the op is a `triton_op`: Inductor traces its body and launches the kernel from
    its own generated code. Under the interpreter it is a plain custom op (interpreted kernels
    cannot be traced) that the generated code calls. Either way the result is eager's."""
    from torch._inductor.utils import fresh_cache, run_and_get_code

    def block(x, residual, weight):
        return fxsp_triton.fused_add_rms_norm(x, residual, weight, 1e-6)

    x, residual, weight = _inputs(4, 96, torch.bfloat16)
    with fresh_cache():
        compiled = torch.compile(block, fullgraph=True)
        (out, residual_out), codes = run_and_get_code(compiled, x, residual, weight)
    code = "\n".join(codes)
    if triton_kernels.runs_interpreted():
        assert "torch.ops.fxsp_triton.fused_add_rms_norm.default(" in code
    else:
        assert "_rms_norm_kernel" in code and "fxsp_triton.fused_add_rms_norm" not in code
    expected_out, expected_residual_out = block(x, residual, weight)
    assert torch.equal(out, expected_out) and torch.equal(residual_out, expected_residual_out)


# --- Provider registry ---------------------------------------------------------------------


def test_triton_is_chosen_for_cuda_only_when_available(monkeypatch):
    assert "triton" in [p.name for p in providers.providers()]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for op in (RMS_NORM, FUSED_ADD_RMS_NORM):
            assert providers.choose(op, "cuda", dtype).name == "triton"
    chosen = providers.choose((RMS_NORM, STATIC_FP8_QUANT), "cuda", torch.bfloat16)
    assert chosen.impls[(RMS_NORM, STATIC_FP8_QUANT)] == (
        fxsp_triton.rms_norm_static_fp8_quant.default
    )
    assert (
        providers.choose((FUSED_ADD_RMS_NORM, STATIC_FP8_QUANT), "cuda", torch.bfloat16).name
        == "triton"
    )
    assert providers.choose(RMS_NORM, "cuda", torch.float64) is None
    assert providers.choose(STATIC_FP8_QUANT, "cuda", torch.bfloat16) is None  # Inductor's

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert providers.choose(RMS_NORM, "cuda", torch.bfloat16) is None


def test_reference_is_chosen_on_cpu():
    for op in (RMS_NORM, FUSED_ADD_RMS_NORM, STATIC_FP8_QUANT, (RMS_NORM, STATIC_FP8_QUANT)):
        assert providers.choose(op, "cpu", torch.bfloat16) is None


def test_flashinfer_is_absent_here():
    if flashinfer_provider.flashinfer_installed():
        pytest.skip("FlashInfer is installed here")
    assert "flashinfer" not in [p.name for p in providers.providers()]
    assert not flashinfer_provider.flashinfer_available()
    assert "flashinfer" not in load_gpu_providers()


class _InPlaceFlashInferNorm(types.SimpleNamespace):
    """Stands in for `flashinfer.norm` on CPU, with its in-place fused_add_rmsnorm."""

    @staticmethod
    def rmsnorm(x, weight, eps):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(
            x.dtype
        )

    @staticmethod
    def fused_add_rmsnorm(x, residual, weight, eps):
        residual.add_(x)
        x.copy_(_InPlaceFlashInferNorm.rmsnorm(residual, weight, eps))


def test_flashinfer_wrappers_are_functional(monkeypatch):
    monkeypatch.setattr(flashinfer_provider, "_flashinfer", lambda part: _InPlaceFlashInferNorm)
    monkeypatch.setattr(flashinfer_provider, "_takes", lambda x, weight: True)
    x, residual, weight = (t.cpu() for t in _inputs(3, 96, torch.bfloat16))
    x_before, residual_before = x.clone(), residual.clone()

    out, residual_out = torch.ops.fxsp_flashinfer.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)
    expected_out, expected_residual_out = ops.fused_add_rms_norm_reference(
        x, residual, weight, 1e-6
    )
    assert torch.equal(residual_out, expected_residual_out)
    _assert_close_to_reference(out, expected_out)  # FlashInfer rounds once, not twice
    _assert_close_to_reference(
        torch.ops.fxsp_flashinfer.rms_norm(x, None, 1e-6), ops.rms_norm_reference(x, None, 1e-6)
    )


def test_flashinfer_falls_back_to_the_reference_where_it_cannot_run():
    x, residual, weight = (t.cpu() for t in _inputs(3, 96, torch.float32))
    assert torch.equal(
        torch.ops.fxsp_flashinfer.rms_norm(x, weight, 1e-6), ops.rms_norm_reference(x, weight, 1e-6)
    )
    out, residual_out = torch.ops.fxsp_flashinfer.fused_add_rms_norm(x, residual, weight, 1e-6)
    expected_out, expected_residual_out = ops.fused_add_rms_norm_reference(
        x, residual, weight, 1e-6
    )
    assert torch.equal(out, expected_out) and torch.equal(residual_out, expected_residual_out)


def test_flashinfer_is_chosen_below_triton_when_available(monkeypatch):
    monkeypatch.setattr(flashinfer_provider, "_flashinfer", lambda part: _InPlaceFlashInferNorm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(providers._providers, "flashinfer", flashinfer_provider.FLASHINFER_PROVIDER)
    only_flashinfer = ("flashinfer",)
    assert providers.choose(RMS_NORM, "cuda", torch.bfloat16, only_flashinfer).name == "flashinfer"
    assert (
        providers.choose(FUSED_ADD_RMS_NORM, "cuda", torch.float16, only_flashinfer).name
        == "flashinfer"
    )
    assert providers.choose(RMS_NORM, "cuda", torch.float32, only_flashinfer) is None
    assert providers.choose(RMS_NORM, "cpu", torch.bfloat16, only_flashinfer) is None
    assert providers.choose(RMS_NORM, "cuda", torch.bfloat16).name == "triton"  # priority 10 > 5


# --- Other processes -----------------------------------------------------------------------


def _run_python(code: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_without_triton_or_flashinfer_nothing_is_registered():
    result = _run_python(
        "import sys, torch\n"
        "sys.modules['triton'] = sys.modules['flashinfer'] = None  # importing them now fails\n"
        "from fxsp.ir.kernels import load_gpu_providers\n"
        "from fxsp.ir.kernels import triton as triton_kernels\n"
        "assert load_gpu_providers() == [], load_gpu_providers()\n"
        "assert not triton_kernels.triton_available()\n"
        "try:\n"
        "    torch.ops.fxsp_triton.rms_norm(torch.ones(2, 4), None, 1e-6)\n"
        "except RuntimeError as error:\n"
        "    assert 'Triton' in str(error)\n"
        "else:\n"
        "    raise AssertionError('ran without Triton')\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_compiled_kernels_trace_to_the_kernel_launch():
    """With compiled (not interpreted) kernels, tracing an op under functionalization, as AOT
    autograd does before Inductor, gives the Triton kernel HOP on the op's own output buffers,
    with the launch's grid and constexprs: what Inductor turns into a call from its generated
    code. Runs on CPU with fake tensors (no kernel is launched)."""
    result = _run_python(TRACE_THE_OPS, TRITON_INTERPRET=None)
    assert result.returncode == 0, result.stderr[-3000:]


# With compiled kernels and no GPU: Triton's driver stands in for an sm90 one, so the kernels'
# mutation analysis compiles them for it.
STAND_IN_SM90 = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.functional_tensor import dispatch_functionalize
from fxsp.ir.kernels import triton as triton_kernels
import triton
from triton.backends.compiler import GPUTarget
assert not triton_kernels.runs_interpreted()
ops = torch.ops.fxsp_triton


class _Hopper:  # what the mutation analysis asks of the driver: the target to compile for
    @staticmethod
    def get_current_target():
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(_Hopper())
higher_order = torch.ops.higher_order

def launch_arguments(launch):
    constants = kernel_side_table.get_constant_args(launch.kwargs["constant_args_idx"])
    return {**launch.kwargs["kwargs"], **constants}
"""

TRACE_THE_OPS = (
    STAND_IN_SM90
    + """

def trace(fn, *args):
    return make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*args)

x = torch.ones(2, 3, 96, dtype=torch.bfloat16)
residual = torch.ones(2, 3, 96, dtype=torch.float32)
weight = torch.ones(96, dtype=torch.bfloat16)
scale = torch.ones(())
cases = [
    (lambda x, r, w, s: ops.rms_norm(x, w, 1e-6), [(torch.bfloat16, (2, 3, 96))], 0),
    (lambda x, r, w, s: ops.fused_add_rms_norm(x, r, w, 1e-6),
     [(torch.float32, (2, 3, 96))] * 2, 0),
    (lambda x, r, w, s: ops.rms_norm_static_fp8_quant(x, None, 1e-6, s, torch.float8_e4m3fnuz),
     [(torch.float8_e4m3fnuz, (2, 3, 96))], 8),
    (lambda x, r, w, s: ops.fused_add_rms_norm_static_fp8_quant(x, r, w, 1e-6, s,
                                                                torch.float8_e4m3fn),
     [(torch.float8_e4m3fn, (2, 3, 96)), (torch.float32, (2, 3, 96))], 7),
]
for (fn, outputs, exponent_bias), written in zip(cases, [["out_ptr"]] + [
        ["out_ptr", "residual_out_ptr"], ["out_ptr"], ["out_ptr", "residual_out_ptr"]]):
    graph = trace(fn, x, residual, weight, scale).graph
    wrapper = higher_order.triton_kernel_wrapper_functional
    launches = graph.find_nodes(op="call_function", target=wrapper)
    assert len(launches) == 1, graph
    assert not [n for n in graph.nodes if str(n.target).startswith("fxsp_triton")], graph
    launch = launches[0]
    kernel = kernel_side_table.get_kernel(launch.kwargs["kernel_idx"])
    # The launch's num_warps makes Inductor wrap the kernel in a one-config autotuner.
    assert getattr(kernel, "fn", kernel) is triton_kernels._rms_norm_kernel, kernel
    # Only the outputs are written: Inductor clones no input for the kernel.
    assert sorted(launch.kwargs["tensors_to_clone"]) == written, launch.kwargs["tensors_to_clone"]
    assert launch.kwargs["grid"] == [(6, 1, 1)], launch.kwargs["grid"]
    constants = launch_arguments(launch)
    assert constants["FP8_EXPONENT_BIAS"] == exponent_bias and constants["BLOCK"] == 128
    assert constants["PASSES_BLOCKS"] == 0, constants
    results = graph.output_node().args[0]
    results = results if isinstance(results, (tuple, list)) else [results]
    assert [(r.meta["val"].dtype, tuple(r.meta["val"].shape)) for r in results] == outputs, results

# Rows longer than one pass: a constant block count, two reads.
triton_kernels.MAX_SINGLE_PASS_COLS = 64
graph = trace(lambda x, w: ops.rms_norm(x, w, 1e-6), x, weight).graph
launch, = graph.find_nodes(op="call_function", target=higher_order.triton_kernel_wrapper_functional)
constants = launch_arguments(launch)
assert constants["PASSES_BLOCKS"] == 1 and constants["BLOCK"] == 4096, constants

# Symbolic rows: the grid follows them, nothing is specialised.
graph = make_fx(dispatch_functionalize(lambda x, w: ops.rms_norm(x, w, 1e-6)),
                tracing_mode="symbolic")(torch.ones(5, 96), torch.ones(96)).graph
launch, = graph.find_nodes(op="call_function", target=higher_order.triton_kernel_wrapper_functional)
rows = launch.kwargs["grid"][0][0]
assert isinstance(rows, torch.fx.Node) and isinstance(rows.meta["val"], torch.SymInt), rows
"""
)


def test_lowering_splices_the_kernel_launch_in():
    """fxsp lowers after AOT autograd has traced the model, so a provider op it puts in the
    graph is never traced again: lowering splices in the op's trace instead. An IR norm on a
    (stand-in) CUDA device lowered with the Triton provider becomes the kernel HOP with the
    launch's grid and arguments, not the opaque op, and Inductor's reinplacing and HOP
    decomposition (which run after fxsp's pass) turn it into one launch writing into fresh
    buffers, with no copies. A plain custom op provider keeps the target swap."""
    result = _run_python(LOWER_TO_THE_KERNEL, TRITON_INTERPRET=None)
    assert result.returncode == 0, result.stderr[-3000:]


LOWER_TO_THE_KERNEL = (
    STAND_IN_SM90
    + """
import dataclasses
import inspect
import operator
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._inductor.fx_utils import FakeTensorUpdater
from torch._inductor.fx_passes.post_grad import decompose_triton_kernel_wrapper_functional
from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
from fxsp.ir import lower_ir, lowering  # noqa: F401 - defines its ops
from fxsp.ir.kernels import flashinfer as flashinfer_provider  # noqa: F401
from fxsp.ir.ops import RMS_NORM
from fxsp.ir.providers import Provider, register_provider

# The Triton provider as it is where CUDA is (fake CUDA tensors need no device).
register_provider(dataclasses.replace(triton_kernels.TRITON_PROVIDER, available=lambda: True))
ir = torch.ops.fxsp

def block(x, residual, weight):
    h, residual = ir.fused_add_rms_norm(x, residual, weight, 1e-6)
    h = ir.rms_norm(h * 2, None, 1e-5)
    return ir.fused_add_rms_norm(h, residual, weight, 1e-6)  # the first's template again

def graph_of(fn, *shapes, dtype=torch.bfloat16):
    with FakeTensorMode():
        args = [torch.empty(shape, dtype=dtype, device="cuda") for shape in shapes]
        return make_fx(fn)(*args)

def calls(graph, target):
    return graph.find_nodes(op="call_function", target=target)

traces = []
class CountedTemplate(lowering._Template):
    def __init__(self, *args):
        traces.append(args[0])
        super().__init__(*args)
lowering._Template = CountedTemplate

gm = graph_of(block, (2, 3, 96), (2, 3, 96), (96,))
assert lower_ir(gm, providers=("triton",)) == {"triton": 3}
gm.graph.lint()
assert traces == [ops.fused_add_rms_norm.default, ops.rms_norm.default], traces
# Neither the IR ops nor the Triton ops, nor a reference decomposition (x + residual, mean).
assert not [n for n in gm.graph.nodes
            if str(n.target).startswith(("fxsp", "aten.add", "aten.mean"))], gm.graph
assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function"), gm.graph
x, residual, weight = gm.graph.find_nodes(op="placeholder")
first, norm, last = launches = calls(gm.graph, higher_order.triton_kernel_wrapper_functional)
for launch in launches:
    assert launch.meta["val"].keys() == set(launch.kwargs["tensors_to_clone"]), launch.meta
    kernel = kernel_side_table.get_kernel(launch.kwargs["kernel_idx"])
    assert getattr(kernel, "fn", kernel) is triton_kernels._rms_norm_kernel, kernel
    assert launch.kwargs["grid"] == [(6, 1, 1)], launch.kwargs["grid"]
    assert launch_arguments(launch)["BLOCK"] == 128
    for name in launch.kwargs["tensors_to_clone"]:  # only the buffers the launch made
        assert launch.kwargs["kwargs"][name].target is torch.ops.aten.empty.memory_format
arguments = [launch_arguments(launch) for launch in launches]
assert (arguments[0]["x_ptr"], arguments[0]["residual_ptr"], arguments[0]["weight_ptr"]) == (
    x, residual, weight)
assert arguments[0]["HAS_RESIDUAL"] and arguments[0]["HAS_WEIGHT"] and arguments[0]["eps"] == 1e-6
assert sorted(first.kwargs["tensors_to_clone"]) == ["out_ptr", "residual_out_ptr"]
assert arguments[1]["x_ptr"].target is torch.ops.aten.mul.Tensor
assert not arguments[1]["HAS_RESIDUAL"] and not arguments[1]["HAS_WEIGHT"]
assert arguments[1]["eps"] == 1e-5 and norm.kwargs["tensors_to_clone"] == ["out_ptr"]
# The last norm reads the second's output and the first's residual_out.
read = {name: (arguments[2][name].target, arguments[2][name].args)
        for name in ("x_ptr", "residual_ptr")}
assert read == {"x_ptr": (operator.getitem, (norm, "out_ptr")),
                "residual_ptr": (operator.getitem, (first, "residual_out_ptr"))}, read
out, residual_out = gm.graph.output_node().args[0]
assert (out.args, residual_out.args) == ((last, "out_ptr"), (last, "residual_out_ptr"))
assert [out.meta["val"].dtype, residual_out.meta["val"].dtype] == [torch.bfloat16] * 2

# What Inductor does next (post_grad.py, after fxsp's pre pass): launches into the buffers.
# (The updater takes the graph in torch 2.11, the graph module in 2.13.)
takes_graph = "graph" in inspect.signature(FakeTensorUpdater).parameters
with torch._guards.detect_fake_mode([x.meta["val"]]):
    reinplace_inplaceable_ops(FakeTensorUpdater(gm.graph if takes_graph else gm), gm.graph)
    decompose_triton_kernel_wrapper_functional(gm.graph)
gm.graph.lint()
assert not calls(gm.graph, higher_order.triton_kernel_wrapper_functional), gm.graph
assert len(calls(gm.graph, higher_order.triton_kernel_wrapper_mutation)) == 3, gm.graph
assert not calls(gm.graph, torch.ops.aten.clone.default), gm.graph
last = calls(gm.graph, higher_order.triton_kernel_wrapper_mutation)[-1].kwargs["kwargs"]
assert list(gm.graph.output_node().args[0]) == [last["out_ptr"], last["residual_out_ptr"]]
assert last["out_ptr"].target is torch.ops.aten.empty.memory_format, gm.graph

# Symbolic rows (a CPU stand-in of the provider: the trace is the same on any device).
register_provider(Provider("triton_on_cpu", dict(triton_kernels.TRITON_PROVIDER.impls),
                           frozenset({"cpu"})))
gm = make_fx(lambda x, w: ir.rms_norm(x, w, 1e-6), tracing_mode="symbolic")(
    torch.ones(5, 96), torch.ones(96))
assert lower_ir(gm, providers=("triton_on_cpu",)) == {"triton_on_cpu": 1}
gm.graph.lint()
launch, = calls(gm.graph, higher_order.triton_kernel_wrapper_functional)
rows = launch.kwargs["grid"][0][0]
assert isinstance(rows, torch.fx.Node) and isinstance(rows.meta["val"], torch.SymInt), rows
ancestors, stack = set(), [rows]
while stack:
    for n in stack.pop().all_input_nodes:
        ancestors.add(n)
        stack.append(n)
assert gm.graph.find_nodes(op="placeholder")[0] in ancestors, ancestors  # the graph's own x

# A provider whose op is a plain custom op (FlashInfer's) is called as it is.
register_provider(Provider("opaque", {RMS_NORM: torch.ops.fxsp_flashinfer.rms_norm.default},
                           frozenset({"cuda"}), priority=20))
gm = graph_of(lambda x, w: ir.rms_norm(x, w, 1e-6), (6, 96), (96,))
assert lower_ir(gm, providers=("opaque",)) == {"opaque": 1}
assert len(calls(gm.graph, torch.ops.fxsp_flashinfer.rms_norm.default)) == 1, gm.graph
"""
)


@needs_kernels
def test_lowered_provider_numerics():
    """IR norms lowered to the Triton ops compute the references' values, the kernels run: on
    the GPU as the spliced kernel launches; in Triton's interpreter on CPU, where the ops are
    plain custom ops (an interpreted launch cannot be traced), as the ops themselves."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxsp.ir import lower_ir

    def block(x, residual, weight):
        h, residual = torch.ops.fxsp.fused_add_rms_norm(x, residual, weight, 1e-6)
        return torch.ops.fxsp.rms_norm(h, None, 1e-5), residual

    stand_in = providers.Provider(
        f"triton_on_{DEVICE}", dict(triton_kernels.TRITON_PROVIDER.impls), frozenset({DEVICE})
    )
    providers.register_provider(stand_in)
    try:
        for dtype, shape in ((torch.bfloat16, (2, 3, 96)), (torch.float32, (5, 1000))):
            x, residual, weight = _inputs(math.prod(shape[:-1]), shape[-1], dtype)
            x, residual = x.reshape(shape), residual.reshape(shape)
            gm = make_fx(block, tracing_mode="fake")(x, residual, weight)
            assert lower_ir(gm, providers=(stand_in.name,)) == {stand_in.name: 2}
            gm.graph.lint()
            gm.recompile()
            if triton_kernels.runs_interpreted():
                assert (
                    len([n for n in gm.graph.nodes if str(n.target).startswith("fxsp_triton.")])
                    == 2
                ), gm.graph
            else:
                assert (
                    len(
                        gm.graph.find_nodes(
                            op="call_function",
                            target=torch.ops.higher_order.triton_kernel_wrapper_functional,
                        )
                    )
                    == 2
                ), gm.graph
            (out, residual_out), (expected_out, expected_residual_out) = (
                gm(x, residual, weight),
                block(x, residual, weight),
            )
            assert torch.equal(residual_out, expected_residual_out)
            _assert_close_to_reference(out, expected_out)
    finally:
        providers.unregister_provider(stand_in.name)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests compile the kernels for real")
def test_kernels_compile_for_gpus():
    """Compile for sm90 (and sm80, and AMD's gfx942 for e4m3fnuz) without a GPU: catches code
    that the interpreter accepts but the GPU compilers do not. Vectorised 16-byte loads and
    stores show that the row layout lets the kernel move memory at full width."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton has no NVIDIA backend here")
    result = _run_python(COMPILE_FOR_GPUS, TRITON_INTERPRET=None)
    assert result.returncode == 0, result.stderr[-3000:]


COMPILE_FOR_GPUS = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from fxsp.ir.kernels.triton import _rms_norm_kernel as kernel

def compile_for(target, dtype, fp8_exponent_bias, single_pass, n_cols_is_one=False):
    pointers = ["x_ptr", "residual_ptr", "weight_ptr", "scale_ptr", "out_ptr", "residual_out_ptr"]
    signature = {name: "*" + dtype for name in pointers}
    signature.update(scale_ptr="*fp32", out_ptr="*u8" if fp8_exponent_bias else "*" + dtype,
                     n_cols="constexpr" if n_cols_is_one else "i32", eps="fp32", fp8_max="fp32")
    element = getattr(tl, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype])
    constants = dict(NORM_DTYPE=element, OUT_DTYPE=element, HAS_RESIDUAL=True, HAS_WEIGHT=True,
                     FP8_EXPONENT_BIAS=fp8_exponent_bias, BLOCK=8192 if single_pass else 4096,
                     PASSES_BLOCKS=0 if single_pass else 16)
    if n_cols_is_one:
        constants["n_cols"] = 1
    signature.update({name: "constexpr" for name in constants})
    aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
               for name in pointers + ([] if n_cols_is_one else ["n_cols"])}
    source = triton.compiler.ASTSource(kernel, signature, constants, aligned)
    return triton.compile(source, target=target, options={"num_warps": 16})

sm90 = GPUTarget("cuda", 90, 32)
ptx = compile_for(sm90, "bf16", 0, True).asm["ptx"]
assert ptx.count("ld.global.v4") >= 6 and ptx.count("st.global.v4") >= 4, ptx.count("ld.global")
assert ".local" not in ptx  # no register spills
ptx = compile_for(sm90, "bf16", 7, True).asm["ptx"]
assert ptx.count("st.global.v4") >= 3
compile_for(sm90, "fp32", 7, False)
compile_for(sm90, "fp16", 0, True, n_cols_is_one=True)
compile_for(GPUTarget("cuda", 80, 32), "bf16", 7, True)
if "amd" in triton.backends.backends:
    compile_for(GPUTarget("hip", "gfx942", 64), "bf16", 8, True)
"""


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests ran in this process")
def test_kernels_in_a_fresh_process():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "not test_kernels_compile_for_gpus and not test_without_triton",
        ],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-5000:]
