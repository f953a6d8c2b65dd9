"""Raising a residual add before a norm: `rms_norm(x + residual)` →
`fused_add_rms_norm(x, residual)`; the sum's other users read the op's second output."""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ...dsl.builder import Builder
from ...dsl.fake import same_shape, tensor_of
from ...dsl.pattern import (
    anything,
    op,
    scalar,
    tensor,
)
from ...dsl.rules import Match, Rule
from ..ops import (
    FUSED_ADD_RMS_NORM,
    HF,
    RMS_NORM,
    spelled,
    spelling_of,
)
from .common import rule

aten, prims = torch.ops.aten, torch.ops.prims


residual_sum = op(aten.add.Tensor, tensor("x"), tensor("residual"), name="residual_out")
add_then_norm = op(RMS_NORM, residual_sum, anything("weight"), scalar("eps"))


def plain_sum(m: Match) -> bool | str:
    x, residual, out = (tensor_of(m[n]) for n in ("x", "residual", "residual_out"))
    if same_shape(x, out) and same_shape(residual, out):
        return True
    return f"the add broadcasts ({tuple(x.shape)} + {tuple(residual.shape)})"


def fuse_add(b: Builder, m: Match) -> Node:
    # The sum is rounded to its dtype, then normalised as the norm was spelled.
    fused = spelled(
        b.call(FUSED_ADD_RMS_NORM, m["x"], m["residual"], m["weight"], m["eps"]),
        spelling_of(m.root) or HF,
    )
    out = b.call(operator.getitem, fused, 0)
    b.replace(m["residual_out"], b.call(operator.getitem, fused, 1))
    return out


def add_norm_rules() -> list[Rule]:
    return [rule("raise.add_rms_norm", add_then_norm, fuse_add, ("residual_out",), plain_sum)]
