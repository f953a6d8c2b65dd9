"""All-gather again in backward (Megatron's way), on the joint graph before partitioning.

After the SP rewrite a column-parallel matmul reads the all-gathered rows, and its weight
gradient (`grad_out^T @ x`) reads them again in backward, so autograd keeps the whole gathered
`x` where the rank holds 1/tp of it. Marked recomputable, the gather and the layout ops after it
(DTensor's split / cat from dim 0 to the token dim, the views to 2-D) run again in backward from
the shard, which is what is kept: 1/tp of those activations, for one more all-gather each in
backward (more bytes than plain TP sends: opt-in, `Options.recompute_gathers`).

AOT autograd's partitioner never recomputes a collective unless it is marked so
(`force_save_collectives`); this pass marks the forward's gathers `MUST_RECOMPUTE`.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node
from torch.utils.checkpoint import CheckpointPolicy

from ..compile.cache import cache_key

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

# What follows a gather before the matmul reads it: its wait, and ops that only move rows
# (DTensor's uneven shards: the pad rows sliced off, then a contiguous copy).
LAYOUT_OPS = {
    c10d.wait_tensor.default,
    aten.clone.default,
    aten.split.Tensor,
    aten.cat.default,
    aten.slice.Tensor,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.permute.default,
    aten.t.default,
    aten.alias.default,
    operator.getitem,
}


def mark_gathers_for_recompute(graph: Graph) -> int:
    """Mark each all-gather of the forward, with the layout ops after it, to run again in
    backward; returns how many gathers were marked."""
    backward = _backward_nodes(graph)
    marked = 0
    for gather in graph.find_nodes(op="call_function", target=c10d.all_gather_into_tensor.default):
        if gather in backward:
            continue
        for node in [gather, *_layout_after(gather)]:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        marked += 1
    return marked


def _backward_nodes(graph: Graph) -> set[Node]:
    """The joint graph's nodes that read a tangent, directly or not."""
    backward: set[Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name.startswith("tangents")) or any(
            a in backward for a in node.all_input_nodes
        ):
            backward.add(node)
    return backward


def _layout_after(gather: Node) -> list[Node]:
    found, todo = [], list(gather.users)
    while todo:
        node = todo.pop()
        if node.op == "call_function" and node.target in LAYOUT_OPS and node not in found:
            found.append(node)
            todo.extend(node.users)
    return found


class RecomputeGathers:
    """`mark_gathers_for_recompute` as Inductor's `joint_custom_pre_pass` (a CustomGraphPass:
    its uuid is fxsp's source, for Inductor's cache key)."""

    def __call__(self, graph: Graph) -> None:
        mark_gathers_for_recompute(graph)

    def uuid(self) -> str:
        return cache_key("recompute_gathers")
