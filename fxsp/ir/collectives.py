"""The one place that knows how collectives are spelled in graphs, read and written.

Two families (flavors): PyTorch's functional collectives, `_c10d_functional.all_reduce(x,
"sum", group)` + `wait_tensor` (what functional collectives, DTensor and Dynamo's rewrite of
in-place `dist.all_reduce` produce), and vLLM's `vllm.all_reduce(x, group)`. Reading:
`kind(node)`, for either family. Writing: reduce-scatter / all-gather along dim 0 of the family
of the all-reduce they replace, so micro-pipeline TP (c10d) or vLLM's own passes see collectives
they know. Above the DSL (it writes through a `Builder` and tells the fake values how its ops'
results are shaped), below every rule set.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal, get_args

import torch
from torch.fx import Node

from ..dsl.builder import Builder
from ..dsl.fake import fresh_result

Flavor = Literal["c10d", "vllm"]
FLAVORS: tuple[str, ...] = get_args(Flavor)

c10d = torch.ops._c10d_functional
C10D_ALL_REDUCE = c10d.all_reduce.default
C10D_REDUCE_SCATTER = c10d.reduce_scatter_tensor.default
C10D_ALL_GATHER = c10d.all_gather_into_tensor.default
WAIT = c10d.wait_tensor.default

# Each returns a fresh dense tensor like its input but for dim 0 (wait_tensor: an empty_like).
fresh_result(WAIT, lambda x: x.shape[0], contiguous_input=True)
fresh_result(C10D_ALL_GATHER, lambda x, world, group: x.shape[0] * world)
fresh_result(C10D_REDUCE_SCATTER, lambda x, reduce_op, world, group: x.shape[0] // world)

# By (namespace, op name): vLLM's ops count whether loaded before fxsp or after.
_KINDS = {
    ("_c10d_functional", "all_reduce"): "all_reduce",
    ("_c10d_functional", "reduce_scatter_tensor"): "reduce_scatter",
    ("_c10d_functional", "all_gather_into_tensor"): "all_gather",
    ("_c10d_functional", "wait_tensor"): "wait",
    ("vllm", "all_reduce"): "all_reduce",
    ("vllm", "reduce_scatter"): "reduce_scatter",
    ("vllm", "all_gather"): "all_gather",
}
COMMUNICATING = frozenset({"all_reduce", "reduce_scatter", "all_gather"})  # not "wait"


def kind(node: Node | Any) -> str | None:
    """What a node (or an op target) does: "all_reduce", "reduce_scatter", "all_gather" (either
    family) or "wait" (c10d's `wait_tensor`); "other" for another of c10d's functional
    collectives (all_to_all_single, broadcast, ...); None for anything else."""
    target = node.target if isinstance(node, Node) else node
    if not isinstance(target, torch._ops.OpOverload):
        return None
    # Asked of every node by the reports' walks: answered once per op, looked up by id (an
    # op's own __hash__ is Python code); the entry keeps its op, so the id stays that op's.
    seen = _KIND_OF.get(id(target))
    if seen is None or seen[0] is not target:
        found = _KINDS.get((target.namespace, target._opname))
        seen = _KIND_OF[id(target)] = (
            target,
            found or ("other" if target.namespace == "_c10d_functional" else None),
        )
    return seen[1]


_KIND_OF: dict[int, tuple] = {}


def vllm_op(name: str) -> Any:
    """`torch.ops.vllm.<name>.default`, or None when vLLM (or a stand-in) is not loaded."""
    try:
        return getattr(torch.ops.vllm, name).default
    except (AttributeError, RuntimeError):
        return None


def check_flavor(flavor: str) -> Flavor:
    """`flavor`, when it is one of `FLAVORS`: another is a bug upstream, not a family to guess."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown collective flavor {flavor!r}, expected one of {FLAVORS}")
    return flavor


def reduce_scatter_rows(b: Builder, x: Node, world: int, group: str, flavor: Flavor) -> Node:
    """Sum of `x` over the group, keeping this rank's block of rows (dim 0)."""
    if check_flavor(flavor) == "vllm":
        return b.call(torch.ops.vllm.reduce_scatter.default, x, 0, world, group)
    return b.call(WAIT, b.call(C10D_REDUCE_SCATTER, x, "sum", world, group))


def all_gather_rows(b: Builder, x: Node, world: int, group: str, flavor: Flavor) -> Node:
    """Every rank's block of rows, concatenated along dim 0."""
    if check_flavor(flavor) == "vllm":
        return b.call(torch.ops.vllm.all_gather.default, x, 0, world, group)
    return b.call(WAIT, b.call(C10D_ALL_GATHER, x, world, group))


def all_reduce_sum(b: Builder, x: Any, group: str, flavor: Flavor) -> Any:
    if check_flavor(flavor) == "vllm":
        return b.call(torch.ops.vllm.all_reduce.default, x, group)
    return b.call(WAIT, b.call(C10D_ALL_REDUCE, x, "sum", group))


# In place of a Builder, runs each op at once: the writers above then compute on tensors, so
# eager code (the IR ops' references) spells collectives as graphs do.
EAGER = SimpleNamespace(call=lambda target, *args: target(*args))
