"""Triton kernels for the norm IR ops, registered as the `"triton"` provider for CUDA.

Importing this module defines six ops under `torch.ops.fxsp_triton` and, when Triton is
importable, registers them in fxsp's provider registry (`providers.py`):

    fxsp_triton::layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor
    fxsp_triton::fused_add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias,
                                      float eps) -> (Tensor out, Tensor residual_out)

    fxsp_triton::rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor
    fxsp_triton::fused_add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps)
        -> (Tensor out, Tensor residual_out)
    fxsp_triton::rms_norm_static_fp8_quant(Tensor x, Tensor? weight, float eps,
                                           Tensor scale, ScalarType fp8_dtype) -> Tensor
    fxsp_triton::fused_add_rms_norm_static_fp8_quant(Tensor x, Tensor residual, Tensor? weight,
                                                     float eps, Tensor scale,
                                                     ScalarType fp8_dtype)
        -> (Tensor out, Tensor residual_out)

The first two have exactly the IR ops' signatures. The last two are the fused forms of an IR
chain, `static_fp8_quant(rms_norm(x, weight, eps), scale, fp8_dtype)` (and the same with
`fused_add_rms_norm`'s first output): their arguments are the producer's followed by the
quant's, less the tensor that connects them. The provider lists them under the chain as a
tuple key, `(RMS_NORM, STATIC_FP8_QUANT)`, so `choose((RMS_NORM, STATIC_FP8_QUANT), ...)` asks
whether a fused kernel exists. The standalone quant op has no kernel here: Inductor's own
generated code for it is already one elementwise pass.

The ops are `torch.library.triton_op`s: custom ops whose body Inductor can see. In a graph that
Inductor compiles, the body is traced and the kernel launch becomes Triton's kernel HOP, so
Inductor calls the kernel from its own generated code with its own lean launcher. fxsp's lowering
puts the ops in after AOT autograd has traced the model, so it splices in that trace itself
(`lowering._call_provider`). Called eagerly, the body launches the kernel directly.

Every kernel produces the same bits as the references in `ops.py`, up to the order (and fused
multiply-adds) of the fp32 sum of squares: x + residual is rounded to its dtype, the normalised
row is rounded to the norm's input dtype before the weight multiply, the product to
promote(input, weight), and the quantised value is (value / scale) clamped and rounded to FP8
with round-to-nearest-even.
Roundings to bf16 and FP8 are done with integer operations rather than casts: the Triton
interpreter truncates bf16 casts and carries FP8 rounding wrongly, and FP8 E4M3FNUZ has no cast
on NVIDIA GPUs; the integer form gives the same bits on every backend. Both cost a few integer
operations per element in a kernel bound by memory traffic.

Each program normalises one row. Rows of up to `MAX_SINGLE_PASS_COLS` elements are read once
and kept in registers; longer rows are read in blocks twice (sum of squares, then normalise),
the number of blocks a compile-time constant.

On CPU tensors the kernels run only in Triton's interpreter (slowly; the provider is never
chosen there, this is for tests): `TRITON_INTERPRET=1` must be set before Triton is first
imported, since Triton builds its own library functions for the interpreter or not at import.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from ...dsl.fake import known_true
from ..ops import (
    FP8_DTYPES,
    FUSED_ADD_LAYER_NORM,
    FUSED_ADD_RMS_NORM,
    LAYER_NORM,
    RMS_NORM,
    STATIC_FP8_QUANT,
    _norm_dtype,
    fp8_max,
)
from ..providers import Provider, register_provider

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the ops below exist but raise when called
    triton = None

MAX_SINGLE_PASS_COLS = 32768
"""Longest row normalised from registers in one read; longer rows take two reads."""
MULTI_PASS_BLOCK = 4096
"""Columns per block when a row is too long for one pass."""

_TRITON_DTYPES = {}  # torch dtype -> Triton dtype, for the dtypes the kernels compute in
_FP8_EXPONENT_BIAS = {torch.float8_e4m3fn: 7, torch.float8_e4m3fnuz: 8}

if triton is not None:
    from triton.runtime.interpreter import InterpretedFunction

    _jit = triton.jit
    _TRITON_DTYPES = {
        torch.float32: tl.float32,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }
else:

    def _jit(fn):  # never launched: without Triton the provider is not registered
        return fn


# ---------------------------------------------------------------------------------------------
# Kernels. Annotations stay strings (`from __future__ import annotations`), which Triton reads;
# so this module imports without Triton.


@_jit
def _round_to(value, DTYPE: tl.constexpr):
    """Round fp32 `value` to DTYPE, to nearest even."""
    if DTYPE == tl.bfloat16:
        # Round on the fp32 bit pattern: keep the top 16 bits, rounding half to even. The cast
        # below is then exact, whichever rounding the backend's cast uses.
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        is_nan = value != value  # noqa: PLR0124 - the NaN test in Triton
        value = tl.where(is_nan, value, bits.to(tl.float32, bitcast=True))
    return value.to(DTYPE)


@_jit
def _fp8_e4m3_bits(value, fp8_max, EXPONENT_BIAS: tl.constexpr):
    """Bit patterns (uint8) of fp32 `value` clamped to +-fp8_max and rounded to nearest even
    in FP8 E4M3: EXPONENT_BIAS 7 is float8_e4m3fn, 8 is float8_e4m3fnuz."""
    is_nan = value != value  # noqa: PLR0124 - the NaN test in Triton
    value = tl.minimum(tl.maximum(value, -fp8_max), fp8_max)
    bits = value.to(tl.int32, bitcast=True)
    negative = bits < 0
    exponent = ((bits >> 23) & 0xFF) - 127
    significand = (bits & 0x7FFFFF) | 0x800000  # with the implicit leading one
    # Keep 3 mantissa bits (shift out 20); below the smallest normal, 2**(1 - bias), shift
    # further so the result counts subnormal steps. 30 already shifts everything out.
    shift = tl.minimum(20 + tl.maximum(1 - EXPONENT_BIAS - exponent, 0), 30)
    kept = significand >> shift
    dropped = significand & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    round_up = (dropped > half) | ((dropped == half) & ((kept & 1) == 1))
    # exponent field << 3, plus the kept bits with their leading one, is the encoding; a
    # rounding carry moves into the exponent field by itself.
    code = (tl.maximum(exponent + EXPONENT_BIAS - 1, 0) << 3) + kept + round_up.to(tl.int32)
    if EXPONENT_BIAS == 8:  # e4m3fnuz: no negative zero; 0x80 is its only NaN
        code = tl.where(negative & (code != 0), code | 0x80, code)
        code = tl.where(is_nan, 0x80, code)
    else:
        code = tl.where(negative, code | 0x80, code)
        code = tl.where(is_nan, 0x7F, code)
    return code.to(tl.uint8)


@_jit
def _load_norm_input(
    x_ptr,
    residual_ptr,
    residual_out_ptr,
    offsets,
    mask,
    NORM_DTYPE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RESIDUAL: tl.constexpr,
):
    """The norm's input in fp32: x, or x + residual rounded to NORM_DTYPE (and stored)."""
    h = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        summed = _round_to(h + residual, NORM_DTYPE)
        if STORE_RESIDUAL:
            tl.store(residual_out_ptr + offsets, summed, mask=mask)
        h = summed.to(tl.float32)
    return h


@_jit
def _store_norm_output(
    h,
    rstd,
    weight_ptr,
    out_ptr,
    offsets,
    cols,
    mask,
    scale,
    fp8_max,
    NORM_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    FP8_EXPONENT_BIAS: tl.constexpr,
):
    out = _round_to(h * rstd, NORM_DTYPE)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out = _round_to(out.to(tl.float32) * weight, OUT_DTYPE)
    if FP8_EXPONENT_BIAS:
        quotient = tl.math.div_rn(out.to(tl.float32), scale)
        tl.store(out_ptr + offsets, _fp8_e4m3_bits(quotient, fp8_max, FP8_EXPONENT_BIAS), mask=mask)
    else:
        tl.store(out_ptr + offsets, out, mask=mask)


@_jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    scale_ptr,  # inputs; unused ones are dummies
    out_ptr,
    residual_out_ptr,  # outputs; out is uint8 when quantising
    n_cols,
    eps,
    fp8_max,
    NORM_DTYPE: tl.constexpr,  # dtype of the norm's input (x's, or that of x + residual)
    OUT_DTYPE: tl.constexpr,  # promote(NORM_DTYPE, weight's dtype), before any quantisation
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    FP8_EXPONENT_BIAS: tl.constexpr,  # 0: store OUT_DTYPE; 7 or 8: quantise to E4M3
    BLOCK: tl.constexpr,
    PASSES_BLOCKS: tl.constexpr,  # 0: one pass over a row of <= BLOCK; n: two passes of n blocks
):
    row_start = tl.program_id(0).to(tl.int64) * n_cols
    cols = tl.arange(0, BLOCK)
    scale = 1.0
    if FP8_EXPONENT_BIAS:
        scale = tl.load(scale_ptr).to(tl.float32)
    if PASSES_BLOCKS == 0:
        mask = cols < n_cols
        h = _load_norm_input(
            x_ptr,
            residual_ptr,
            residual_out_ptr,
            row_start + cols,
            mask,
            NORM_DTYPE,
            HAS_RESIDUAL,
            True,
        )
        # n_cols + 0.0 is n_cols in fp32, also when Triton has made n_cols == 1 a constant.
        mean_square = tl.math.div_rn(tl.sum(h * h, axis=0), n_cols + 0.0)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(mean_square + eps))
        _store_norm_output(
            h,
            rstd,
            weight_ptr,
            out_ptr,
            row_start + cols,
            cols,
            mask,
            scale,
            fp8_max,
            NORM_DTYPE,
            OUT_DTYPE,
            HAS_WEIGHT,
            FP8_EXPONENT_BIAS,
        )
    else:
        # The block count is a constexpr: a loop bounded by the runtime n_cols is one that
        # Triton 3.6's interpreter cannot run (it takes the bound as a 1-element array).
        sum_of_squares = tl.zeros([BLOCK], dtype=tl.float32)
        for block in range(PASSES_BLOCKS):
            start = block * BLOCK
            mask = start + cols < n_cols
            h = _load_norm_input(
                x_ptr,
                residual_ptr,
                residual_out_ptr,
                row_start + start + cols,
                mask,
                NORM_DTYPE,
                HAS_RESIDUAL,
                True,
            )
            sum_of_squares += h * h
        mean_square = tl.math.div_rn(tl.sum(sum_of_squares, axis=0), n_cols + 0.0)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(mean_square + eps))
        # The second read recomputes x + residual rather than reading residual_out back: no
        # ordering between this program's stores and loads is needed.
        for block in range(PASSES_BLOCKS):
            start = block * BLOCK
            mask = start + cols < n_cols
            h = _load_norm_input(
                x_ptr,
                residual_ptr,
                residual_out_ptr,
                row_start + start + cols,
                mask,
                NORM_DTYPE,
                HAS_RESIDUAL,
                False,
            )
            _store_norm_output(
                h,
                rstd,
                weight_ptr,
                out_ptr,
                row_start + start + cols,
                start + cols,
                mask,
                scale,
                fp8_max,
                NORM_DTYPE,
                OUT_DTYPE,
                HAS_WEIGHT,
                FP8_EXPONENT_BIAS,
            )


@_jit
def _layer_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    bias_ptr,  # inputs; unused ones are dummies
    out_ptr,
    residual_out_ptr,
    n_cols,
    eps,
    NORM_DTYPE: tl.constexpr,  # dtype of the norm's input (x's, or that of x + residual)
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    PASSES_BLOCKS: tl.constexpr,  # 0: one read of a row of <= BLOCK; n: three of n blocks
):
    """LayerNorm as `ops.layer_norm_reference` computes it: the mean, then the mean of squared
    deviations, in fp32; the weight and bias applied in fp32; one rounding to NORM_DTYPE."""
    row_start = tl.program_id(0).to(tl.int64) * n_cols
    cols = tl.arange(0, BLOCK)
    if PASSES_BLOCKS == 0:
        mask = cols < n_cols
        h = _load_norm_input(
            x_ptr,
            residual_ptr,
            residual_out_ptr,
            row_start + cols,
            mask,
            NORM_DTYPE,
            HAS_RESIDUAL,
            True,
        )
        mean = tl.math.div_rn(tl.sum(h, axis=0), n_cols + 0.0)
        deviation = tl.where(mask, h - mean, 0.0)
        variance = tl.math.div_rn(tl.sum(deviation * deviation, axis=0), n_cols + 0.0)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(variance + eps))
        _store_layer_norm_output(
            deviation,
            rstd,
            weight_ptr,
            bias_ptr,
            out_ptr,
            row_start + cols,
            cols,
            mask,
            NORM_DTYPE,
            HAS_WEIGHT,
            HAS_BIAS,
        )
    else:
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for block in range(PASSES_BLOCKS):
            start = block * BLOCK
            mask = start + cols < n_cols
            total += _load_norm_input(
                x_ptr,
                residual_ptr,
                residual_out_ptr,
                row_start + start + cols,
                mask,
                NORM_DTYPE,
                HAS_RESIDUAL,
                True,
            )
        mean = tl.math.div_rn(tl.sum(total, axis=0), n_cols + 0.0)
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for block in range(PASSES_BLOCKS):
            start = block * BLOCK
            mask = start + cols < n_cols
            h = _load_norm_input(
                x_ptr,
                residual_ptr,
                residual_out_ptr,
                row_start + start + cols,
                mask,
                NORM_DTYPE,
                HAS_RESIDUAL,
                False,
            )
            deviation = tl.where(mask, h - mean, 0.0)
            squares += deviation * deviation
        variance = tl.math.div_rn(tl.sum(squares, axis=0), n_cols + 0.0)
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(variance + eps))
        for block in range(PASSES_BLOCKS):
            start = block * BLOCK
            mask = start + cols < n_cols
            h = _load_norm_input(
                x_ptr,
                residual_ptr,
                residual_out_ptr,
                row_start + start + cols,
                mask,
                NORM_DTYPE,
                HAS_RESIDUAL,
                False,
            )
            _store_layer_norm_output(
                h - mean,
                rstd,
                weight_ptr,
                bias_ptr,
                out_ptr,
                row_start + start + cols,
                start + cols,
                mask,
                NORM_DTYPE,
                HAS_WEIGHT,
                HAS_BIAS,
            )


@_jit
def _store_layer_norm_output(
    deviation,
    rstd,
    weight_ptr,
    bias_ptr,
    out_ptr,
    offsets,
    cols,
    mask,
    NORM_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    out = deviation * rstd
    if HAS_WEIGHT:
        out = out * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, _round_to(out, NORM_DTYPE), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launching


def runs_interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1), and so
    take CPU tensors."""
    return triton is not None and isinstance(_rms_norm_kernel, InterpretedFunction)


def _triton_dtype(dtype: torch.dtype):
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"fxsp_triton norms compute in fp32, bf16 or fp16, not {dtype}")
    return _TRITON_DTYPES[dtype]


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None = None,
    fp8_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the norm kernel over the rows of x; returns (out, residual_out or None).

    This is the body of the `triton_op`s below, so it runs three ways: eagerly (the kernel
    launches directly), under fake tensors (it gives the outputs' shapes and dtypes: the ops'
    fake implementations), and traced under functionalization (`wrap_triton` records the
    launch as Triton's kernel HOP, which Inductor compiles into its own generated code). So it
    calls only torch ops, never reads tensor data and never branches on a symbolic size.
    """
    hidden = x.shape[-1]
    if fp8_dtype is not None and fp8_dtype not in FP8_DTYPES:
        raise TypeError(f"static FP8 quant to {fp8_dtype}; expected one of {FP8_DTYPES}")
    if fp8_dtype is not None and scale.numel() != 1:
        raise ValueError("static FP8 quant takes one per-tensor scale")
    residual_out, norm_input = _norm_input(x, residual, weight=weight)
    out_dtype = _norm_dtype(norm_input, weight)
    out = torch.empty(x.shape, dtype=out_dtype if fp8_dtype is None else fp8_dtype, device=x.device)
    fake = is_fake(x) or x.is_meta
    kernel = _kernel_for(x, fake)
    if kernel is None or known_true(x.numel() == 0):
        return out, residual_out

    # Every call takes this path, so it calls torch as little as it can: the kernel reads rows
    # at flat offsets, which any contiguous tensor of x's shape has.
    x = _dense(x)
    block, passes_blocks, num_warps = _launch_shape(
        int(hidden), MAX_SINGLE_PASS_COLS, MULTI_PASS_BLOCK
    )
    # A dummy stands in for absent tensors; the constexpr flags keep it from being read.
    dummy = x
    if scale is not None and scale.device != x.device:
        scale = scale.to(x.device)
    with _on_device_of(x, fake):
        kernel[(x.numel() // hidden,)](
            x,
            dummy if residual is None else _dense(residual),
            dummy if weight is None else _dense(weight),
            dummy if scale is None else scale,
            out if fp8_dtype is None else out.view(torch.uint8),  # FP8 as its bit patterns
            dummy if residual_out is None else residual_out,
            hidden,
            eps,
            0.0 if fp8_dtype is None else fp8_max(fp8_dtype),
            NORM_DTYPE=_triton_dtype(norm_input.dtype),
            OUT_DTYPE=_triton_dtype(out_dtype),
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            FP8_EXPONENT_BIAS=0 if fp8_dtype is None else _FP8_EXPONENT_BIAS[fp8_dtype],
            BLOCK=block,
            PASSES_BLOCKS=passes_blocks,
            num_warps=num_warps,
        )
    return out, residual_out


def _norm_input(
    x: torch.Tensor, residual: torch.Tensor | None, **vectors: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(residual_out or None, the norm's input: x, or residual_out) for a norm kernel's launch,
    after checking the residual's and each per-feature vector's (weight, bias) shapes."""
    hidden = x.shape[-1]
    for name, t in vectors.items():
        if t is not None and t.shape != (hidden,):
            raise ValueError(f"{name} of shape {tuple(t.shape)} for rows of {hidden}")
    if residual is None:
        return None, x
    if residual.shape != x.shape:
        raise ValueError(f"residual of shape {tuple(residual.shape)} for x of {tuple(x.shape)}")
    residual_out = torch.empty(
        x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device
    )
    return residual_out, residual_out


def _launch_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the LayerNorm kernel over the rows of x; returns (out, residual_out or None). Runs
    the three ways `_launch` does."""
    hidden = x.shape[-1]
    residual_out, norm_input = _norm_input(x, residual, weight=weight, bias=bias)
    out = torch.empty(x.shape, dtype=norm_input.dtype, device=x.device)
    fake = is_fake(x) or x.is_meta
    kernel = _kernel_for(x, fake, _layer_norm_kernel)
    if kernel is None or known_true(x.numel() == 0):
        return out, residual_out
    x = _dense(x)
    block, passes_blocks, num_warps = _launch_shape(
        int(hidden), MAX_SINGLE_PASS_COLS, MULTI_PASS_BLOCK
    )
    dummy = x
    with _on_device_of(x, fake):
        kernel[(x.numel() // hidden,)](
            x,
            dummy if residual is None else _dense(residual),
            dummy if weight is None else _dense(weight),
            dummy if bias is None else _dense(bias),
            out,
            dummy if residual_out is None else residual_out,
            hidden,
            eps,
            NORM_DTYPE=_triton_dtype(norm_input.dtype),
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            PASSES_BLOCKS=passes_blocks,
            num_warps=num_warps,
        )
    return out, residual_out


@functools.cache
def _launch_shape(hidden: int, max_single_pass: int, multi_pass_block: int) -> tuple:
    """(BLOCK, PASSES_BLOCKS, num_warps) for rows of `hidden` (cached: Triton's own helpers
    cost microseconds a call)."""
    if hidden <= max_single_pass:
        block, passes_blocks = 1 << max(hidden - 1, 0).bit_length(), 0  # next power of 2
    else:
        block, passes_blocks = multi_pass_block, -(-hidden // multi_pass_block)
    return block, passes_blocks, min(max(block // 256, 1), 16)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _kernel_for(x: torch.Tensor, fake: bool, kernel=None):
    """The kernel (default: the RMSNorm one) to launch on x's rows, or None where there is
    nothing to run: fake tensors under the interpreter (compiled kernels take fake tensors
    through `wrap_triton`, whose launch records a graph node or does nothing)."""
    kernel = _rms_norm_kernel if kernel is None else kernel
    if fake:
        return None if triton is None or runs_interpreted() else wrap_triton(kernel)
    if triton is None:
        raise RuntimeError("fxsp_triton ops need Triton, which is not installed")
    if runs_interpreted():  # torch before 2.13 refuses to wrap an interpreted kernel
        return kernel
    if not x.is_cuda:
        raise RuntimeError(
            "fxsp_triton ops run on CUDA tensors; CPU tensors only where the "
            "kernels run in Triton's interpreter (see runs_interpreted())"
        )
    return wrap_triton(kernel)


def _on_device_of(x: torch.Tensor, fake: bool) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device, which need not be x's (checked first: the
    # switch costs more than the check, and this is every call's path).
    if x.is_cuda and not fake and x.get_device() != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# The ops. `triton_op` makes each a custom op whose body Inductor can trace: compiled, the
# kernel is called from Inductor's generated code with its own launcher; eager, the body runs
# with `wrap_triton` a no-op, so the kernel launches directly. The body run on fake tensors is
# the fake implementation.


def _op(name: str):
    """Define the op `name` with the decorated function as body and fake implementation: a
    `triton_op` where the kernels are compiled. Interpreted kernels cannot be traced (tracing
    would record no launch at all), so under the interpreter, or without Triton, the op is a
    plain custom op that a compiled graph calls as it is."""

    def define(body):
        if triton is not None and not runs_interpreted():
            return triton_op(name, mutates_args=())(body)
        op = torch.library.custom_op(name, mutates_args=())(body)
        op.register_fake(body)
        return op

    return define


@_op("fxsp_triton::rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


@_op("fxsp_triton::fused_add_rms_norm")
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps)


@_op("fxsp_triton::rms_norm_static_fp8_quant")
def rms_norm_static_fp8_quant(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor,
    fp8_dtype: torch.dtype,
) -> torch.Tensor:
    return _launch(x, None, weight, eps, scale, fp8_dtype)[0]


@_op("fxsp_triton::fused_add_rms_norm_static_fp8_quant")
def fused_add_rms_norm_static_fp8_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor,
    fp8_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps, scale, fp8_dtype)


@_op("fxsp_triton::layer_norm")
def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return _launch_layer_norm(x, None, weight, bias, eps)[0]


@_op("fxsp_triton::fused_add_layer_norm")
def fused_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_layer_norm(x, residual, weight, bias, eps)


# ---------------------------------------------------------------------------------------------
# Provider registration


def triton_available() -> bool:
    """Triton is importable and a CUDA device is present."""
    return triton is not None and torch.cuda.is_available()


_ops = torch.ops.fxsp_triton
TRITON_PROVIDER = Provider(
    name="triton",
    impls={
        RMS_NORM: _ops.rms_norm.default,
        FUSED_ADD_RMS_NORM: _ops.fused_add_rms_norm.default,
        (RMS_NORM, STATIC_FP8_QUANT): _ops.rms_norm_static_fp8_quant.default,
        (FUSED_ADD_RMS_NORM, STATIC_FP8_QUANT): _ops.fused_add_rms_norm_static_fp8_quant.default,
        LAYER_NORM: _ops.layer_norm.default,
        FUSED_ADD_LAYER_NORM: _ops.fused_add_layer_norm.default,
    },
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32}),
    priority=10,
    available=triton_available,
)

if triton is not None:
    register_provider(TRITON_PROVIDER)
