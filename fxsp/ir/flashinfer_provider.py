"""FlashInfer's RMSNorm kernels as the `"flashinfer"` provider for CUDA.

Importing this module defines two custom ops with the IR ops' signatures,

    fxsp_flashinfer::rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor
    fxsp_flashinfer::fused_add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps)
        -> (Tensor out, Tensor residual_out)

and, when FlashInfer is importable, registers them in fxsp's provider registry with priority 5
(below Triton's 10: fxsp's own kernels round exactly like the reference, FlashInfer does not).

FlashInfer's kernels take bf16/fp16 rows with a weight of the same dtype, and its
`fused_add_rmsnorm` works in place. The wrappers make them functional by cloning, supply a
weight of ones when there is none, and fall back to the reference for calls FlashInfer cannot
take (other dtypes, a weight of another dtype), so the ops are correct for every input.

Numerics: FlashInfer multiplies by the weight before rounding the normalised row, where the
reference rounds to the input dtype first; results may differ from the reference by one
rounding (one ulp of bf16/fp16).
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch

from .ops import FUSED_ADD_RMS_NORM, RMS_NORM, fused_add_rms_norm_reference, rms_norm_reference
from .providers import Provider, register_provider

_FLASHINFER_DTYPES = frozenset({torch.bfloat16, torch.float16})


@functools.cache
def _flashinfer_norm() -> ModuleType | None:
    """`flashinfer.norm`, or None where FlashInfer is missing or fails to import."""
    try:
        import flashinfer.norm
    except Exception:  # noqa: BLE001 - a broken install (no CUDA, no cuda-python) counts as absent
        return None
    return flashinfer.norm


def flashinfer_installed() -> bool:
    """FlashInfer is installed (checked without importing it)."""
    return importlib.util.find_spec("flashinfer") is not None


def flashinfer_available() -> bool:
    """FlashInfer imports and a CUDA device is present."""
    return torch.cuda.is_available() and _flashinfer_norm() is not None


def _takes(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether FlashInfer's kernels can compute this call."""
    return (x.is_cuda and x.dtype in _FLASHINFER_DTYPES and x.numel() > 0
            and (weight is None or weight.dtype == x.dtype) and _flashinfer_norm() is not None)


def _weight_or_ones(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    # Multiplying by ones in fp32 changes nothing, so this is the unweighted norm.
    return torch.ones(x.shape[-1], dtype=x.dtype, device=x.device) if weight is None else weight


@torch.library.custom_op("fxsp_flashinfer::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if not _takes(x, weight):
        return rms_norm_reference(x, weight, eps)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = _flashinfer_norm().rmsnorm(rows, _weight_or_ones(x, weight).contiguous(), eps)
    return out.reshape(x.shape)


@torch.library.custom_op("fxsp_flashinfer::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not _takes(x, weight) or residual.dtype != x.dtype or residual.shape != x.shape:
        return fused_add_rms_norm_reference(x, residual, weight, eps)
    # FlashInfer writes the norm into its input and the sum into its residual: give it copies.
    out = x.reshape(-1, x.shape[-1]).clone()
    residual_out = residual.reshape(-1, x.shape[-1]).clone()
    _flashinfer_norm().fused_add_rmsnorm(out, residual_out, _weight_or_ones(x, weight).contiguous(),
                                         eps)
    return out.reshape(x.shape), residual_out.reshape(x.shape)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    return x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))


@fused_add_rms_norm.register_fake
def _(x, residual, weight, eps):
    residual_out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return x.new_empty(x.shape, dtype=_out_dtype(residual_out, weight)), residual_out


_ops = torch.ops.fxsp_flashinfer
FLASHINFER_PROVIDER = Provider(
    name="flashinfer",
    impls={RMS_NORM: _ops.rms_norm.default, FUSED_ADD_RMS_NORM: _ops.fused_add_rms_norm.default},
    devices=frozenset({"cuda"}),
    dtypes=_FLASHINFER_DTYPES,
    priority=5,
    available=flashinfer_available,
)

# Only the cheap check here: importing FlashInfer can take seconds (it may JIT-compile), so
# that waits for the first `available()` or call.
if flashinfer_installed():
    register_provider(FLASHINFER_PROVIDER)
