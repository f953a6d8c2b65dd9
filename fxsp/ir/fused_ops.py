"""Fused IR ops: a sum all-reduce and the RMSNorm (and static FP8 quant) that reads it, as one op.

    allreduce_rms_norm(x, weight?, eps, group_name, flavor)
        -> (out, reduced)                        out = rms_norm(all_reduce(x))
    allreduce_fused_add_rms_norm(x, residual, weight?, eps, group_name, flavor)
        -> (out, residual_out)                   residual_out = all_reduce(x) + residual,
                                                 out = rms_norm(residual_out)
    allreduce_rms_norm_static_fp8_quant(x, weight?, eps, scale, fp8_dtype, group_name, flavor)
        -> (out_fp8, reduced)
    allreduce_fused_add_rms_norm_static_fp8_quant(x, residual, weight?, eps, scale, fp8_dtype,
                                                  group_name, flavor)
        -> (out_fp8, residual_out)

Arguments: the norm's (and the quant's) first, then the all-reduce's group and flavor, as in
`fxsp.all_reduce`. The second output is what the residual stream reads: the all-reduced `x` for
the plain norm (a model's first layer keeps it as its residual), the sum for the fused add. It
stays in the activation dtype; only the norm output is quantised. Returning it costs nothing:
FlashInfer's kernel writes it anyway (the plain norm runs as the fused add with a zero residual).

`fxsp/sp/allreduce_norm.py` rewrites chains of core IR ops into these for small batches.
The reference implementation (the default everywhere, and how `lower_ir` lowers them when no
provider serves them) is exactly the chain it replaced: `ops.all_reduce_reference`, then the
norm and quant references of `ops.py`. So rewriting and lowering with the reference changes no
value.

On CUDA, FlashInfer's trtllm all-reduce fusion kernel implements them as the
`"flashinfer_allreduce"` provider (`kernels/flashinfer.py`). Whether the rewrite runs at all is
decided by `fxsp.policy.fusion` (TP > 1, one pipeline stage, SM90 / SM100 family, FlashInfer
importable).
"""

from __future__ import annotations

import functools

import torch
from torch.library import Library

from . import lowering
from .ops import (
    _fused_add_rms_norm_fake,
    _rms_norm_fake,
    all_reduce_reference,
    fused_add_rms_norm_reference,
    rms_norm_reference,
    static_fp8_quant_reference,
)

_lib = Library("fxsp", "FRAGMENT")  # noqa: TOR901 - fxsp owns this namespace (ops.py defines it)

_lib.define(
    "allreduce_rms_norm(Tensor x, Tensor? weight, float eps, str group_name, str flavor)"
    " -> (Tensor, Tensor)"
)
_lib.define(
    "allreduce_fused_add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps,"
    " str group_name, str flavor) -> (Tensor, Tensor)"
)
_lib.define(
    "allreduce_rms_norm_static_fp8_quant(Tensor x, Tensor? weight, float eps, Tensor scale,"
    " ScalarType fp8_dtype, str group_name, str flavor) -> (Tensor, Tensor)"
)
_lib.define(
    "allreduce_fused_add_rms_norm_static_fp8_quant(Tensor x, Tensor residual,"
    " Tensor? weight, float eps, Tensor scale, ScalarType fp8_dtype, str group_name,"
    " str flavor) -> (Tensor, Tensor)"
)

Tensors = tuple[torch.Tensor, torch.Tensor]


# --- reference implementations: the unfused chain ---------------------------------------------


def allreduce_rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, group_name: str, flavor: str
) -> Tensors:
    reduced = all_reduce_reference(x, group_name, flavor)
    return rms_norm_reference(reduced, weight, eps), reduced


def allreduce_fused_add_rms_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    group_name: str,
    flavor: str,
) -> Tensors:
    # all_reduce(x) + residual: the rule also matches residual + all_reduce(x), which is the
    # same value (IEEE addition commutes, type promotion too).
    return fused_add_rms_norm_reference(
        all_reduce_reference(x, group_name, flavor), residual, weight, eps
    )


def allreduce_rms_norm_static_fp8_quant_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor,
    fp8_dtype: torch.dtype,
    group_name: str,
    flavor: str,
) -> Tensors:
    out, reduced = allreduce_rms_norm_reference(x, weight, eps, group_name, flavor)
    return static_fp8_quant_reference(out, scale, fp8_dtype), reduced


def allreduce_fused_add_rms_norm_static_fp8_quant_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor,
    fp8_dtype: torch.dtype,
    group_name: str,
    flavor: str,
) -> Tensors:
    out, residual_out = allreduce_fused_add_rms_norm_reference(
        x, residual, weight, eps, group_name, flavor
    )
    return static_fp8_quant_reference(out, scale, fp8_dtype), residual_out


fxsp = torch.ops.fxsp
ALLREDUCE_RMS_NORM = fxsp.allreduce_rms_norm.default
ALLREDUCE_FUSED_ADD_RMS_NORM = fxsp.allreduce_fused_add_rms_norm.default
ALLREDUCE_RMS_NORM_STATIC_FP8_QUANT = fxsp.allreduce_rms_norm_static_fp8_quant.default
ALLREDUCE_FUSED_ADD_RMS_NORM_STATIC_FP8_QUANT = (
    fxsp.allreduce_fused_add_rms_norm_static_fp8_quant.default
)
FUSED_IR_OPS = (
    ALLREDUCE_RMS_NORM,
    ALLREDUCE_FUSED_ADD_RMS_NORM,
    ALLREDUCE_RMS_NORM_STATIC_FP8_QUANT,
    ALLREDUCE_FUSED_ADD_RMS_NORM_STATIC_FP8_QUANT,
)
REFERENCES = dict(
    zip(
        FUSED_IR_OPS,
        (
            allreduce_rms_norm_reference,
            allreduce_fused_add_rms_norm_reference,
            allreduce_rms_norm_static_fp8_quant_reference,
            allreduce_fused_add_rms_norm_static_fp8_quant_reference,
        ),
        strict=True,
    )
)


def arguments(op: torch._ops.OpOverload, args: tuple) -> dict:
    """A fused op's arguments by name; the ops without a residual or a quant have none."""
    return dict(zip((a.name for a in op._schema.arguments), args))


def fake(op: torch._ops.OpOverload, *args) -> Tensors:
    """The shapes and dtypes of `op(*args)` (also of every provider's kernel for it): the
    norm's, in the quant's dtype where it quantises."""
    a = arguments(op, args)
    if a.get("residual") is None:
        out, second = _rms_norm_fake(a["x"], a["weight"], a["eps"]), torch.empty_like(a["x"])
    else:
        out, second = _fused_add_rms_norm_fake(a["x"], a["residual"], a["weight"], a["eps"])
    return out if "fp8_dtype" not in a else out.new_empty(out.shape, dtype=a["fp8_dtype"]), second


for _op, _reference in REFERENCES.items():
    _lib.impl(_op._opname, _reference, "CompositeExplicitAutograd")
    torch.library.register_fake(_op, functools.partial(fake, _op), lib=_lib)
    lowering.register_reference(_op, _reference)
