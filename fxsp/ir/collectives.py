"""The one place that knows how collectives are spelled in graphs, read and written.

Reading: `_c10d_functional.all_reduce(x, "sum", group)` + `wait_tensor` (what functional
collectives, DTensor and Dynamo's rewrite of in-place `dist.all_reduce` produce) and vLLM's
`vllm.all_reduce(x, group)`. Writing: reduce-scatter / all-gather along dim 0 of the same
family as the all-reduce they replace, so micro-pipeline TP (c10d) or vLLM's own passes see
collectives they know.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from ..builder import Builder

c10d = torch.ops._c10d_functional
C10D_ALL_REDUCE = c10d.all_reduce.default
WAIT = c10d.wait_tensor.default


def vllm_op(name: str) -> Any:
    """`torch.ops.vllm.<name>.default`, or None when vLLM (or a stand-in) is not loaded."""
    try:
        return getattr(torch.ops.vllm, name).default
    except (AttributeError, RuntimeError):
        return None


def reduce_scatter_rows(b: Builder, x: Node, world: int, group: str, flavor: str) -> Node:
    """Sum of `x` over the group, keeping this rank's block of rows (dim 0)."""
    if flavor == "vllm":
        return b.call(vllm_op("reduce_scatter"), x, 0, world, group)
    return b.call(WAIT, b.call(c10d.reduce_scatter_tensor.default, x, "sum", world, group))


def all_gather_rows(b: Builder, x: Node, world: int, group: str, flavor: str) -> Node:
    """Every rank's block of rows, concatenated along dim 0."""
    if flavor == "vllm":
        return b.call(vllm_op("all_gather"), x, 0, world, group)
    return b.call(WAIT, b.call(c10d.all_gather_into_tensor.default, x, world, group))


def all_reduce_sum(b: Builder, x: Node, group: str, flavor: str) -> Node:
    if flavor == "vllm":
        return b.call(vllm_op("all_reduce"), x, group)
    return b.call(WAIT, b.call(C10D_ALL_REDUCE, x, "sum", group))
