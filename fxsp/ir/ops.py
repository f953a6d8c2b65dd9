"""fxsp's IR: one functional op per concept, under the `torch.ops.fxsp` namespace.

Every spelling of a concept in a model's graph is raised to one of these (see `raising/`),
so the rewrite rules need no variant per spelling, dtype or epsilon. Each op has a fake
implementation (shapes only) and a reference implementation in plain torch that runs on any
device and is also what `lowering.py` decomposes it into by default.

Numerics: norms compute in fp32. RMSNorm: the normalised activations are cast back to the input
dtype before the weight multiply, and the result has dtype promote(x, weight), which is what
HF-style models compute. LayerNorm: as torch's decomposition of `F.layer_norm`, var_mean in fp32,
the weight and bias applied in fp32, one rounding to x's dtype at the end.

Spellings. Models compute the same concept with different roundings: the weight multiplied in
fp32 before one down-cast (`F.rms_norm`), the residual sum normalised before it is rounded
(vLLM's `vllm_ir.fused_add_rms_norm`). Raising records the spelling it came from in
`node.meta[SPELLING]` and lowering emits that spelling again, so fxsp never changes what a
graph computes; a rewrite's new IR nodes take the spelling of the node they replace (see
`fxsp.dsl.rules.CARRIED_META`). Without the key a node has the op's own numerics above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.library import Library

from ..dsl.rules import CARRIED_META
from .collectives import EAGER, Flavor, all_reduce_sum

fxsp_lib = Library("fxsp", "DEF")  # noqa: TOR901 - fxsp owns this namespace

fxsp_lib.define("rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor")
fxsp_lib.define(
    "fused_add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps) -> (Tensor, Tensor)"
)
fxsp_lib.define("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor")
fxsp_lib.define(
    "fused_add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps)"
    " -> (Tensor, Tensor)"
)
fxsp_lib.define("static_fp8_quant(Tensor x, Tensor scale, ScalarType fp8_dtype) -> Tensor")
# A sum all-reduce. `flavor` says whose collective it came from ("c10d" or "vllm") so that the
# rewrite emits collectives of the same family; other reductions are never raised to this op.
fxsp_lib.define("all_reduce(Tensor x, str group_name, str flavor) -> Tensor")

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)

SPELLING = "fxsp_spelling"  # node meta: how the model spelled this IR op (one of the below)
# Norms (and fused add + norm: the sum rounded to its dtype, then the norm spelled so):
HF = "hf"  # normalise in fp32, round to x's dtype, multiply by the weight: the ops' own numerics
WEIGHT_FIRST = "weight_first"  # multiply by the weight in fp32, round once (F.rms_norm, Gemma)
VLLM_IR = "vllm_ir"  # vLLM's `vllm_ir.rms_norm` (vLLM then picks its kernel)
VLLM_IR_FUSED = "vllm_ir_fused"  # `vllm_ir.fused_add_rms_norm`: normalises the fp32 sum
# LayerNorm's variance: var_mean (torch's decomposition, the op's own numerics), or
TWO_PASS = "two_pass"  # mean, then mean((x - mean)²): hand-written (HF's CohereLayerNorm)
MEAN_THEN_VAR = "mean_then_var"  # mean, and var(correction=0) apart: hand-written with x.var
# Static FP8 quant:
DIVIDE = "divide"  # x / scale in fp32: the op's own numerics
RECIPROCAL = "reciprocal"  # x * (1 / scale) in fp32


CARRIED_META.add(SPELLING)


def spelled(node, spelling: str):
    """Mark an IR node with the spelling it was raised from; returns the node."""
    node.meta[SPELLING] = spelling
    return node


def spelling_of(node) -> str | None:
    return node.meta.get(SPELLING)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else normed * weight


def rms_norm_weight_first(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed if weight is None else normed * weight).to(_norm_dtype(x, weight))


def fused_add_rms_norm_weight_first(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual_out = x + residual
    return rms_norm_weight_first(residual_out, weight, eps), residual_out


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual_out = x + residual
    return rms_norm_reference(residual_out, weight, eps), residual_out


def _layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, moments
) -> torch.Tensor:
    # All in fp32; the weight and bias promote into the fp32 value, as in torch's decomposition;
    # one rounding, to x's dtype, at the end.
    xf = x.float()
    var, mean = moments(xf)
    normed = (xf - mean) * torch.rsqrt(var + eps)
    normed = normed if weight is None else normed * weight
    return (normed if bias is None else normed + bias).to(x.dtype)


def _var_mean(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.var_mean(xf, -1, correction=0, keepdim=True)


def _two_passes(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = xf.mean(-1, keepdim=True)
    return (xf - mean).pow(2).mean(-1, keepdim=True), mean


def _mean_then_var(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return xf.var(-1, correction=0, keepdim=True), xf.mean(-1, keepdim=True)


def layer_norm_reference(x, weight, bias, eps: float) -> torch.Tensor:
    """As torch's decomposition of `F.layer_norm` computes it (var_mean)."""
    return _layer_norm(x, weight, bias, eps, _var_mean)


def layer_norm_two_pass(x, weight, bias, eps: float) -> torch.Tensor:
    """The variance as the mean of squared deviations (HF's CohereLayerNorm)."""
    return _layer_norm(x, weight, bias, eps, _two_passes)


def layer_norm_mean_then_var(x, weight, bias, eps: float) -> torch.Tensor:
    """The mean and `var(correction=0)` as two reductions (hand-written with `x.var`)."""
    return _layer_norm(x, weight, bias, eps, _mean_then_var)


def _with_add(norm):
    def fused_add(x, residual, weight, bias, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        residual_out = x + residual
        return norm(residual_out, weight, bias, eps), residual_out

    fused_add.__name__ = f"fused_add_{norm.__name__}"
    return fused_add


fused_add_layer_norm_reference = _with_add(layer_norm_reference)
fused_add_layer_norm_two_pass = _with_add(layer_norm_two_pass)
fused_add_layer_norm_mean_then_var = _with_add(layer_norm_mean_then_var)


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 dtype: 448 for e4m3fn, 240 for e4m3fnuz."""
    return float(torch.finfo(dtype).max)


def static_fp8_quant_reference(
    x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype
) -> torch.Tensor:
    bound = fp8_max(fp8_dtype)
    return (x.float() / scale.float()).clamp(-bound, bound).to(fp8_dtype)


def static_fp8_quant_reciprocal(
    x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype
) -> torch.Tensor:
    bound = fp8_max(fp8_dtype)
    return (x.float() * scale.float().reciprocal()).clamp(-bound, bound).to(fp8_dtype)


def all_reduce_reference(x: torch.Tensor, group_name: str, flavor: Flavor) -> torch.Tensor:
    return all_reduce_sum(EAGER, x, group_name, flavor)


def _norm_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    return x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)


fxsp_lib.impl("rms_norm", rms_norm_reference, "CompositeExplicitAutograd")
fxsp_lib.impl("fused_add_rms_norm", fused_add_rms_norm_reference, "CompositeExplicitAutograd")
fxsp_lib.impl("layer_norm", layer_norm_reference, "CompositeExplicitAutograd")
fxsp_lib.impl("fused_add_layer_norm", fused_add_layer_norm_reference, "CompositeExplicitAutograd")
fxsp_lib.impl("static_fp8_quant", static_fp8_quant_reference, "CompositeExplicitAutograd")
fxsp_lib.impl("all_reduce", all_reduce_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("fxsp::rms_norm", lib=fxsp_lib)
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape, dtype=_norm_dtype(x, weight))


@torch.library.register_fake("fxsp::fused_add_rms_norm", lib=fxsp_lib)
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    residual_out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    return x.new_empty(x.shape, dtype=_norm_dtype(residual_out, weight)), residual_out


@torch.library.register_fake("fxsp::layer_norm", lib=fxsp_lib)
def _layer_norm_fake(x, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.register_fake("fxsp::fused_add_layer_norm", lib=fxsp_lib)
def _fused_add_layer_norm_fake(x, residual, weight, bias, eps):
    residual_out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    return torch.empty_like(residual_out), residual_out


@torch.library.register_fake("fxsp::static_fp8_quant", lib=fxsp_lib)
def _static_fp8_quant_fake(x, scale, fp8_dtype):
    return x.new_empty(x.shape, dtype=fp8_dtype)


@torch.library.register_fake("fxsp::all_reduce", lib=fxsp_lib)
def _all_reduce_fake(x, group_name, flavor):
    return torch.empty_like(x)


fxsp = torch.ops.fxsp
RMS_NORM = fxsp.rms_norm.default
FUSED_ADD_RMS_NORM = fxsp.fused_add_rms_norm.default
LAYER_NORM = fxsp.layer_norm.default
FUSED_ADD_LAYER_NORM = fxsp.fused_add_layer_norm.default
STATIC_FP8_QUANT = fxsp.static_fp8_quant.default
ALL_REDUCE = fxsp.all_reduce.default
IR_OPS = (
    RMS_NORM,
    FUSED_ADD_RMS_NORM,
    LAYER_NORM,
    FUSED_ADD_LAYER_NORM,
    STATIC_FP8_QUANT,
    ALL_REDUCE,
)


@dataclass(frozen=True)
class NormKind:
    """A kind of row-wise norm over the last dim, and its fused add + norm. Both take x (and the
    residual) first, then `params`, the same in both: the rules that move a norm (raising the
    residual add into it, SP) read its kind from this table, not from a rule of their own."""

    name: str
    norm: Any
    fused_add: Any
    params: tuple[str, ...]  # the arguments after x (norm) or after x, residual (fused add)


NORM_KINDS = (
    NormKind("rms_norm", RMS_NORM, FUSED_ADD_RMS_NORM, ("weight", "eps")),
    NormKind("layer_norm", LAYER_NORM, FUSED_ADD_LAYER_NORM, ("weight", "bias", "eps")),
)
NORMS = frozenset(kind.norm for kind in NORM_KINDS)
FUSED_ADD_NORMS = frozenset(kind.fused_add for kind in NORM_KINDS)


def norm_of(fused_add) -> Any:
    """The norm a fused add + norm op applies to the sum."""
    return next(kind.norm for kind in NORM_KINDS if kind.fused_add is fused_add)
