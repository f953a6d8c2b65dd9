"""Raising sum all-reduces: `wait_tensor(_c10d_functional.all_reduce(x, "sum", g))` (functional
collectives, DTensor, Dynamo's rewrite of in-place `dist.all_reduce`) and `vllm.all_reduce(x, g)`
→ `fxsp.all_reduce(x, g, flavor)`. Other reductions ("avg", "max", ...) are never raised."""

from __future__ import annotations

import torch
from torch.fx import Node

from ...dsl.builder import Builder
from ...dsl.fake import same_shape, tensor_of
from ...dsl.pattern import (
    op,
    string,
    tensor,
)
from ...dsl.rules import Match, Rule
from ..collectives import C10D_ALL_REDUCE, WAIT
from ..ops import ALL_REDUCE
from .common import rule

aten, prims = torch.ops.aten, torch.ops.prims


c10d_sum = op(WAIT, op(C10D_ALL_REDUCE, tensor("x"), "sum", string("group")))
# Dynamo's functional form of an in-place `dist.all_reduce(x)`: x = copy(x, wait(all_reduce(x))).
c10d_sum_in_place = op(aten.copy.default, tensor("x"), c10d_sum)


def copy_is_plain(m: Match) -> bool | str:
    """copy(x, y) is y when it neither broadcasts nor casts."""
    x, out = tensor_of(m["x"]), tensor_of(m.root)
    return (same_shape(x, out) and x.dtype == out.dtype) or "the copy broadcasts or casts"


def to_all_reduce(flavor: str):
    def rewrite(b: Builder, m: Match) -> Node:
        return b.call(ALL_REDUCE, m["x"], m["group"], flavor)

    return rewrite


def collective_rules(ops: dict) -> list[Rule]:
    """Sum all-reduces of both families; vLLM's where its op is loaded (`ops`: name -> op)."""
    rules = [
        rule(
            "raise.c10d_all_reduce_in_place",
            c10d_sum_in_place,
            to_all_reduce("c10d"),
            where=copy_is_plain,
        ),
        rule("raise.c10d_all_reduce", c10d_sum, to_all_reduce("c10d")),
    ]
    if (target := ops.get("vllm.all_reduce")) is not None:
        rules.append(
            rule(
                "raise.vllm_all_reduce",
                op(target, tensor("x"), string("group")),
                to_all_reduce("vllm"),
            )
        )
    return rules
