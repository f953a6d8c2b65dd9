"""Raising static FP8 quant: `(x / scale).clamp(-M, M).to(fp8)` (or `x * scale.reciprocal()`; x in
fp32, or bf16/fp16 promoted by an fp32 scale), M the fp8 dtype's max → `fxsp.static_fp8_quant`."""

from __future__ import annotations

import torch
from torch.fx import Node

from ...dsl.builder import Builder
from ...dsl.fake import tensor_of
from ...dsl.pattern import (
    alt,
    dtype,
    op,
    scalar,
    tensor,
)
from ...dsl.rules import Match, Rule
from ..ops import (
    DIVIDE,
    FP8_DTYPES,
    RECIPROCAL,
    STATIC_FP8_QUANT,
    fp8_max,
    spelled,
)
from .common import F32, LOW, cast, fp32_of, rule, same_size, short

aten, prims = torch.ops.aten, torch.ops.prims


scale = tensor("scale")
reciprocal = op(aten.reciprocal.default, scale, name="reciprocal")
inverse_scale = alt(reciprocal, op(aten.mul.Tensor, reciprocal, 1.0), name="inverse_scale")
# A bf16/fp16 x divided by an fp32 scale promotes to fp32 by itself: the same as x.float() / scale.
x_in_fp32 = alt(fp32_of(), tensor("x", LOW))
quotient = alt(
    op(aten.div.Tensor, x_in_fp32, scale),
    op(aten.mul.Tensor, x_in_fp32, inverse_scale),
    name="quotient",
)


low, high = scalar("low"), scalar("high")
clamped = alt(
    op(aten.clamp_max.default, op(aten.clamp_min.default, quotient, low), high),
    op(aten.clamp_min.default, op(aten.clamp_max.default, quotient, high), low),
    op(aten.clamp.default, quotient, low, high),
)


fp8_quant = cast(clamped, dtype("fp8_dtype", FP8_DTYPES))


def fp8_range(m: Match) -> bool | str:
    bound, (lo, hi) = fp8_max(m["fp8_dtype"]), (m["low"], m["high"])
    if (lo, hi) != (-bound, bound):
        return f"clamp to [{lo}, {hi}] is not {m['fp8_dtype']}'s range ±{bound}"
    if tensor_of(m["quotient"]).dtype != F32:
        return f"x / scale is computed in {short(tensor_of(m['quotient']).dtype)}, not fp32"
    s = tensor_of(m["scale"])
    if not same_size(s.numel(), 1) or s.dim() > tensor_of(m["x"]).dim():
        return f"scale of shape {list(s.shape)} is not one per-tensor value"
    return True


def to_fp8_quant(b: Builder, m: Match) -> Node:
    spelling = RECIPROCAL if "reciprocal" in m.bindings else DIVIDE
    return spelled(b.call(STATIC_FP8_QUANT, m["x"], m["scale"], m["fp8_dtype"]), spelling)


def fp8_rules() -> list[Rule]:
    return [
        rule(
            "raise.static_fp8_quant",
            fp8_quant,
            to_fp8_quant,
            ("xf", "reciprocal", "inverse_scale"),
            fp8_range,
        )
    ]
