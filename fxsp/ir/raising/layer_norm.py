"""Raising LayerNorm: every post-grad spelling → `fxsp.layer_norm(x, weight, bias, eps)`.

    torch   `F.layer_norm`, `nn.LayerNorm` as Inductor decomposes them:
            var, mean = var_mean(xf, -1, correction=0); (xf - mean) * rsqrt(var + eps)
    two-pass  mean = xf.mean(-1); var = (xf - mean).pow(2).mean(-1); the same product
            (HF's CohereLayerNorm, written by hand; recorded as `ops.TWO_PASS`)
    x.var   mean = xf.mean(-1); var = xf.var(-1, correction=0) (`ops.MEAN_THEN_VAR`)

then `* weight` (any [H] value: Nemotron's LayerNorm1P multiplies by a computed `w + 1`, Cohere
by `w.float()`) and `+ bias`, each optional, all in fp32 (xf: x, or a bf16 / fp16 x up-cast),
and one cast back to x's dtype. The undecomposed `aten.native_layer_norm` / `aten.layer_norm`
(export graphs) too. Look-alikes stay as they are, with the reason: eps added after the rsqrt,
a norm over another dim, an unbiased variance (correction != 0), a result cast to another dtype.

A weighted norm contains an unweighted one, so `unweighted_layer_norm_rules` run in the pass
after `layer_norm_rules`, as for RMSNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from ...dsl.builder import Builder
from ...dsl.fake import tensor_of
from ...dsl.pattern import (
    ADD,
    alt,
    anything,
    dims,
    dtype,
    getitem,
    op,
    such_that,
    tensor,
)
from ...dsl.rules import Match, Rule
from ..ops import LAYER_NORM, MEAN_THEN_VAR, TWO_PASS, spelled
from .common import (
    FLOATS,
    all_of,
    as_dtype_of,
    cast_back_to_x,
    eps,
    fp32_of,
    maybe_cast,
    per_feature_weight,
    rule,
)
from .norms import aten_norm_ok

aten = torch.ops.aten

xf = fp32_of()


def _normalised(centred: Any, variance: Any) -> Any:
    """(x - mean) / sqrt(var + eps)"""
    return op(aten.mul.Tensor, centred, op(aten.rsqrt.default, op(ADD, variance, eps)))


_var_mean = op(
    aten.var_mean.correction,
    xf,
    dims([-1]),
    correction=anything("correction"),
    keepdim=True,
    name="var_mean",
)
_by_var_mean = _normalised(op(aten.sub.Tensor, xf, getitem(_var_mean, 1)), getitem(_var_mean, 0))
# The two-pass form. Written out as Cohere does, `x - mean` is two nodes; once, it is one.
_mean = op(aten.mean.dim, xf, dims([-1]), True, name="mean")
_deviation = op(aten.sub.Tensor, xf, _mean)
_squared = alt(
    op(aten.pow.Tensor_Scalar, _deviation, 2), op(aten.mul.Tensor, _deviation, _deviation)
)
_by_two_passes = _normalised(_deviation, op(aten.mean.dim, _squared, dims([-1]), True))
# The mean and the variance as two reductions of xf (`x - x.mean(-1)`, `x.var(-1)`).
_var = op(
    aten.var.correction,
    xf,
    dims([-1]),
    correction=anything("correction"),
    keepdim=True,
    name="var",
)
_by_mean_then_var = _normalised(_deviation, _var)
normed = alt(_by_var_mean, _by_two_passes, _by_mean_then_var)

_vector = {"where": lambda n: getattr(tensor_of(n), "ndim", None) == 1, "doc": "(1-D)"}
weight, bias = tensor("weight", **_vector), tensor("bias", **_vector)


def _no_bias_follows(node: Node) -> bool:
    return not any(
        user.target is aten.add.Tensor
        and any(a is not node and getattr(tensor_of(a), "ndim", None) == 1 for a in user.args)
        for user in node.users
    )


# The whole fp32 computation, then one rounding (a root cast) for a bf16 / fp16 x. A weighted
# norm followed by its bias is matched whole, not as a weighted norm then an add.
down = dtype("down", FLOATS)
affine = alt(
    op(aten.add.Tensor, op(aten.mul.Tensor, normed, weight), bias),
    op(aten.add.Tensor, normed, bias),
    such_that(op(aten.mul.Tensor, normed, weight), _no_bias_follows, "(no bias added after)"),
)
layer_norm_affine = maybe_cast(affine, down)
layer_norm_plain = maybe_cast(normed, down)
# Undecomposed torch ops (export graphs): x's dtype in, x's dtype out.
_aten_args = (
    tensor("x", FLOATS),
    anything("shape"),
    anything("weight"),
    anything("bias"),
    anything("eps"),
)
aten_layer_norm = alt(
    getitem(op(aten.native_layer_norm.default, *_aten_args), 0),
    op(aten.layer_norm.default, *_aten_args, anything()),
)


def exact_layer_norm(m: Match) -> bool | str:
    """The matched norm computes what fxsp.layer_norm computes (as the spelling recorded)."""
    correction = m.get("correction")
    return all_of(
        lambda: (
            correction in (None, 0)
            or f"the variance has correction={correction}, a LayerNorm's has 0"
        ),
        lambda: cast_back_to_x(m),
        lambda: per_feature_weight(m["x"], m.get("weight")),
        lambda: _per_feature_bias(m),
    )


def aten_layer_norm_ok(m: Match) -> bool | str:
    return all_of(
        lambda: aten_norm_ok(m),
        lambda: m["bias"] is None or isinstance(m["bias"], Node) or "bias is not a tensor",
        lambda: _per_feature_bias(m),
    )


def _per_feature_bias(m: Match) -> bool | str:
    # One value per feature, as a weight is.
    return per_feature_weight(m["x"], m.get("bias")) is True or (
        f"bias of shape {list(tensor_of(m['bias']).shape)} is not one value per feature"
    )


def to_layer_norm(b: Builder, m: Match) -> Node:
    out = b.call(LAYER_NORM, m["x"], m.get("weight"), m.get("bias"), float(m["eps"]))
    if m.get("var") is not None:
        spelled(out, MEAN_THEN_VAR)
    elif m.get("mean") is not None:
        spelled(out, TWO_PASS)
    return as_dtype_of(b, out, m.root)


def layer_norm_rules() -> list[Rule]:
    return [
        rule("raise.layer_norm", layer_norm_affine, to_layer_norm, ("xf",), exact_layer_norm),
        rule("raise.aten_layer_norm", aten_layer_norm, to_layer_norm, where=aten_layer_norm_ok),
    ]


def unweighted_layer_norm_rules() -> list[Rule]:
    """Every weighted norm contains an unweighted one: these run in a pass after the above."""
    return [
        rule(
            "raise.layer_norm_unweighted",
            layer_norm_plain,
            to_layer_norm,
            ("xf",),
            exact_layer_norm,
        )
    ]
