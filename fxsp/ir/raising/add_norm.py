"""Raising a residual add before a norm: `norm(x + residual, ...)` → `fused_add_norm(x,
residual, ...)` for each kind of norm (`ops.NORM_KINDS`: RMSNorm, LayerNorm), its other
arguments kept; the sum's other users read the op's second output."""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ...dsl.builder import Builder
from ...dsl.fake import same_shape, tensor_of
from ...dsl.pattern import (
    anything,
    op,
    tensor,
)
from ...dsl.rules import Match, Rule
from ..ops import NORM_KINDS, NormKind, spelled, spelling_of
from .common import rule

aten, prims = torch.ops.aten, torch.ops.prims


residual_sum = op(aten.add.Tensor, tensor("x"), tensor("residual"), name="residual_out")


def add_then_norm(kind: NormKind) -> object:
    return op(kind.norm, residual_sum, *map(anything, kind.params))


def plain_sum(m: Match) -> bool | str:
    x, residual, out = (tensor_of(m[n]) for n in ("x", "residual", "residual_out"))
    if same_shape(x, out) and same_shape(residual, out):
        return True
    return f"the add broadcasts ({tuple(x.shape)} + {tuple(residual.shape)})"


def fuse_add(kind: NormKind):
    def rewrite(b: Builder, m: Match) -> Node:
        # The sum is rounded to its dtype, then normalised as the norm was spelled.
        fused = b.call(kind.fused_add, m["x"], m["residual"], *m.root.args[1:])
        if spelling_of(m.root) is not None:
            spelled(fused, spelling_of(m.root))
        out = b.call(operator.getitem, fused, 0)
        b.replace(m["residual_out"], b.call(operator.getitem, fused, 1))
        return out

    return rewrite


def add_norm_rules() -> list[Rule]:
    return [
        rule(
            f"raise.add_{kind.name}",
            add_then_norm(kind),
            fuse_add(kind),
            ("residual_out",),
            plain_sum,
        )
        for kind in NORM_KINDS
    ]
