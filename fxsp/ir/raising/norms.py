"""Raising RMSNorm: the decomposed norm (HF/Llama, `F.rms_norm`, `nn.RMSNorm`, any eps, fp32 or
bf16/fp16 through fp32) and the undecomposed `aten.rms_norm` / `aten._fused_rms_norm` →
`fxsp.rms_norm`. A LayerNorm (mean-centred) is matched only to be refused by name."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from ...dsl.builder import Builder
from ...dsl.fake import tensor_of
from ...dsl.pattern import (
    ADD,
    CLONE,
    alt,
    anything,
    dims,
    dtype,
    getitem,
    op,
    such_that,
    tensor,
    through,
)
from ...dsl.rules import Match, Rule
from ..ops import (
    HF,
    RMS_NORM,
    WEIGHT_FIRST,
    spelled,
)
from .common import (
    F32,
    FLOATS,
    all_of,
    as_dtype_of,
    cast,
    cast_back_to_x,
    eps,
    fp32_of,
    is_upcast,
    maybe_cast,
    per_feature_weight,
    rule,
    same_size,
)

aten, prims = torch.ops.aten, torch.ops.prims


xf = fp32_of()


def _mean_of_square(v: Any) -> Any:
    return op(
        aten.mean.dim,
        alt(op(aten.pow.Tensor_Scalar, v, 2), op(aten.mul.Tensor, v, v)),
        dims([-1]),
        True,
    )


mean_square = _mean_of_square(xf)
# A LayerNorm's pieces: x - mean(x) and the variance of the last dim, however spelled (HF's
# Cohere norm computes x - mean twice; torch's decomposition uses var_mean). Matched only so that
# `exact_norm` refuses the norm by its mean-centring; a match with any of them binds `centred`.
_centred = tensor("centred")
_row_mean = op(aten.mean.dim, _centred, dims([-1]), True, name="row_mean")
_var_mean = op(
    aten.var_mean.correction,
    _centred,
    dims([-1]),
    correction=anything(),
    keepdim=True,
    name="var_mean",
)
centred_x = alt(
    op(aten.sub.Tensor, _centred, _row_mean), op(aten.sub.Tensor, _centred, getitem(_var_mean, 1))
)
variance = alt(
    _mean_of_square(centred_x),
    getitem(_var_mean, 0),
    op(aten.var.correction, _centred, dims([-1]), correction=anything(), keepdim=True),
)
# x / sqrt(mean(x²) + eps), in fp32
normed = op(
    aten.mul.Tensor,
    alt(xf, centred_x),
    op(aten.rsqrt.default, op(ADD, alt(mean_square, variance), eps)),
)
weight = tensor("weight")
down = dtype("down", FLOATS)
# Left in fp32 (no cast back), the norm is exact only on an fp32 x: asked of the node first, so a
# bf16 F.rms_norm's inner `normed * w` is refused at once, not after a whole match.
normed_of_fp32 = such_that(
    normed,
    lambda n: not any(isinstance(a, Node) and is_upcast(a) for a in n.args),
    "(of an fp32 x: a bf16 or fp16 norm's fp32 result must be cast back)",
)


# torch's decomposition makes its fp32 result contiguous before the down-cast: a clone when x
# is not contiguous.
rms_norm_weighted = alt(
    op(
        aten.mul.Tensor, weight, alt(normed_of_fp32, cast(normed, down))
    ),  # HF/Llama: w * normed.to(dtype)
    cast(through(op(aten.mul.Tensor, normed, weight), CLONE), down),  # F.rms_norm, Gemma
)
rms_norm_unweighted = maybe_cast(through(normed, CLONE), down)
# Undecomposed torch ops (export graphs, versions or backends that keep the fused op).
# Their numerics: (normed * w).type_as(x), the default eps is fp32's machine epsilon.
aten_rms_norm = alt(
    getitem(
        op(
            aten._fused_rms_norm.default,
            tensor("x", FLOATS),
            anything("shape"),
            anything("weight"),
            anything("eps"),
        ),
        0,
    ),
    op(
        aten.rms_norm.default,
        tensor("x", FLOATS),
        anything("shape"),
        anything("weight"),
        anything("eps"),
    ),
)


def exact_norm(m: Match) -> bool | str:
    """The matched norm computes what fxsp.rms_norm computes, up to the rounding the module
    docstring allows."""
    if m.get("centred") is not None or is_centred(m["x"]):
        return "x is mean-centred (x - mean(x)): a LayerNorm, not an RMSNorm"
    return all_of(lambda: cast_back_to_x(m), lambda: per_feature_weight(m["x"], m.get("weight")))


def aten_norm_ok(m: Match) -> bool | str:
    x, shape = tensor_of(m["x"]), m["shape"]
    last_dim = isinstance(shape, (list, tuple)) and len(shape) == 1
    if not (last_dim and same_size(shape[0], x.shape[-1])):
        return f"normalized_shape {list(shape)} is not the last dim"
    if m["eps"] is not None and not (isinstance(m["eps"], (int, float)) and m["eps"] > 0):
        return f"eps {m['eps']!r} is not a positive number"
    if m["weight"] is not None and not isinstance(m["weight"], Node):
        return "weight is not a tensor"
    return per_feature_weight(m["x"], m["weight"])


def to_rms_norm(b: Builder, m: Match, spelling: str | None = None) -> Node:
    """`spelling` None: HF's when the weight multiplies the rounded normalised value (the
    pattern's root is that multiply), else the weight first (`F.rms_norm`, `aten.rms_norm`)."""
    eps_value = m["eps"] if m["eps"] is not None else torch.finfo(F32).eps
    if spelling is None:
        weight_last = m.get("weight") is None or m.root.target is aten.mul.Tensor
        spelling = HF if weight_last else WEIGHT_FIRST
    out = spelled(b.call(RMS_NORM, m["x"], m.get("weight"), float(eps_value)), spelling)
    return as_dtype_of(b, out, m.root)


def is_centred(node: Node) -> bool:
    """`a - mean(a, -1)`: the input of a LayerNorm's variance."""
    if node.target is not aten.sub.Tensor or len(node.args) != 2:
        return False
    a, mean = node.args
    return isinstance(mean, Node) and mean.target is aten.mean.dim and mean.args[0] is a


def norm_rules() -> list[Rule]:
    return [
        rule("raise.rms_norm", rms_norm_weighted, to_rms_norm, ("xf",), exact_norm),
        rule("raise.aten_rms_norm", aten_rms_norm, to_rms_norm, where=aten_norm_ok),
    ]


def unweighted_norm_rules() -> list[Rule]:
    """Every weighted norm contains an unweighted one: these run in a pass after `norm_rules`."""
    return [
        rule("raise.rms_norm_unweighted", rms_norm_unweighted, to_rms_norm, ("xf",), exact_norm)
    ]
