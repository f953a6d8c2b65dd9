"""Does a node act on each row of a rows value independently?

A rows value has the tokens as its leading dims and the hidden dim last ([T, H], [1, T, H],
[B, S, H]). An op acts per row when each output row depends only on the same input row, so a
value sharded by rows stays sharded through it. Decided from the op's tags and the meta shapes,
never from a list of model-specific ops; anything not proved row-wise gets the reason why.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from ..dsl.fake import known_true, same_shape, tensor_of
from ..dsl.pattern import CAST, VIEW, target_name

aten = torch.ops.aten

# Views that keep the elements in row-major order: only the grouping of the leading dims changes.
ORDER_KEEPING_VIEWS = VIEW | {
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
}
# Ops working along the dims given as their argument 1 (an int or a list of ints).
ALONG_DIMS = frozenset(
    {
        aten.sum.default,
        aten.mean.default,
        aten.sum.dim_IntList,
        aten.mean.dim,
        aten.amax.default,
        aten.amin.default,
        aten.prod.dim_int,
        aten.var.correction,
        aten.var_mean.correction,
        aten._softmax.default,
        aten._log_softmax.default,
        aten.cumsum.default,
        aten.cumprod.default,
        aten.argmax.default,
        aten.argmin.default,
    }
)
MATMULS = frozenset({aten.mm.default, aten.bmm.default, aten.addmm.default, aten.matmul.default})


def acts_per_row(node: Node, rows: Node | None = None) -> bool | str:
    """True when `node` acts on each row of `rows` independently, else the reason it may not.
    `rows` is by default the first tensor argument of the result's shape (else the first one).

    Row-wise: pointwise ops whose other tensor operands broadcast along the rows (scalars,
    0-d tensors, [H], [1, H], [1, 1, H]); casts that stay on the device; clones; views and
    reshapes that keep the rows leading and the hidden dim unchanged ([T, H] <-> [1, T, H] <->
    [B, S, H] with B * S = T). Not: random ops (each rank would draw other numbers), ops that
    mix rows (attention, softmax or cumsum over the tokens, reductions over the token dims,
    matmuls), views that reorder rows or split the hidden dim.
    """
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return f"{node.name} is not an ATen op call"
    name = target_name(node.target)
    out = _first_tensor(node)
    rows = _rows_operand(node) if rows is None else rows
    x = tensor_of(rows) if rows is not None else None
    if x is None or out is None:
        return f"{name}: no meta shapes to judge by"
    if x.dim() < 2:
        return f"{name}: its input {list(x.shape)} has no rows (fewer than 2 dims)"
    verdict = _verdict(node, name, rows, x, out)
    if torch.Tag.nondeterministic_seeded in node.target.tags:
        random = f"{name} draws random numbers: sharded rows would draw other ones"
        return random if verdict is True else f"{verdict}; {random}"
    return verdict


def row_input(node: Node) -> Node | str:
    """The input whose rows `node` passes on, each row to itself, as rows of the same hidden
    size: SP applies `node` to a shard of that input as it is. Else the reason why not.

        h * 0.22, h.to(bf16), h.clone(), h.view(1, T, H), h * w[H]   -> h
        h.cumsum(0), h @ w, h.mean(-1), h.view(T, 2, H // 2)         -> why not
    """
    verdict = acts_per_row(node)
    if verdict is not True:
        return verdict
    rows, out = _rows_operand(node), _first_tensor(node)
    x = tensor_of(rows)
    if node.target not in ORDER_KEEPING_VIEWS and not same_shape(x, out):
        return (
            f"{target_name(node.target)} turns rows {list(x.shape)} into {list(out.shape)}: "
            "not rows of the same size"
        )
    for i, arg in enumerate(node.args):
        source = _computed_from(arg, rows) if isinstance(arg, Node) and arg is not rows else None
        if source is not None:
            return (
                f"{target_name(node.target)}: operand {i} comes from its rows input through "
                f"{target_name(source.target)} {source.name}: all rows into one"
            )
    return rows


def _computed_from(value: Node, rows: Node, hops: int = 6) -> Node | None:
    """The node within `hops` steps behind `value` that reads `rows` (or None): a broadcast
    operand computed from the rows themselves (a softmax's max over tokens) mixes them."""
    seen, frontier = set(), [value]
    for _ in range(hops):
        for node in frontier:
            if rows in node.all_input_nodes:
                return node
        frontier = [
            a for n in frontier for a in n.all_input_nodes if a not in seen and not seen.add(a)
        ]
    return None


def _rows_operand(node: Node) -> Node | None:
    """The first tensor argument of the result's shape, else the first tensor argument."""
    out = _first_tensor(node)
    tensors = [a for a in node.args if isinstance(a, Node) and tensor_of(a) is not None]
    full = [a for a in tensors if out is not None and same_shape(tensor_of(a), out)]
    return (full or tensors or [None])[0]


def _verdict(node: Node, name: str, rows: Node, x: torch.Tensor, out: torch.Tensor) -> bool | str:
    tags = node.target.tags
    if node.target in CAST:
        if out.device != x.device:
            return f"{name} moves the value from {x.device} to {out.device}"
        return _keeps_shape(name, x, out)
    if torch.Tag.pointwise in tags:
        return _pointwise(node, name, rows, x, out)
    if node.target in ORDER_KEEPING_VIEWS:
        return _keeps_rows(name, x, out)
    if node.target in ALONG_DIMS:
        return _along_last_dim(node, name, x, out)
    if node.target in MATMULS:
        left = node.args[1] if node.target is aten.addmm.default else node.args[0]
        if rows is left:
            return (
                f"{name} contracts over the hidden dim: it changes the hidden dim, not only per row"
            )
        return f"{name} contracts over the token dim: it mixes rows"
    return f"{name} is not pointwise, a cast, a clone or a row-keeping view: it may mix rows"


def _pointwise(node: Node, name: str, rows: Node, x: torch.Tensor, out: torch.Tensor) -> bool | str:
    if not same_shape(x, out):
        return f"{name} broadcasts its input {list(x.shape)} to {list(out.shape)}"
    for i, arg in enumerate(node.args):
        other = tensor_of(arg) if arg is not rows else None
        if other is not None and not _broadcasts_along_rows(other, out):
            return (
                f"{name}: operand {i} of shape {list(other.shape)} has rows of its own, "
                "not one value per row"
            )
    return True


def _broadcasts_along_rows(other: torch.Tensor, out: torch.Tensor) -> bool:
    """`other`, right-aligned against `out`, is 1 in every dim but the last: the same for every
    row."""
    return other.dim() <= out.dim() and all(known_true(d == 1) for d in other.shape[:-1])


def _keeps_shape(name: str, x: torch.Tensor, out: torch.Tensor) -> bool | str:
    return same_shape(x, out) or f"{name} changes the shape {list(x.shape)} -> {list(out.shape)}"


def _keeps_rows(name: str, x: torch.Tensor, out: torch.Tensor) -> bool | str:
    if out.dim() < 2:
        return f"{name} flattens {list(x.shape)} into {list(out.shape)}: it mixes rows and hidden"
    if not known_true(x.shape[-1] == out.shape[-1]):
        return (
            f"{name} changes the hidden dim {list(x.shape)} -> {list(out.shape)}: "
            "it mixes rows and hidden"
        )
    if not known_true(math.prod(x.shape[:-1]) == math.prod(out.shape[:-1])):
        return f"{name} regroups {list(x.shape)} -> {list(out.shape)} with another number of rows"
    return True


def _along_last_dim(node: Node, name: str, x: torch.Tensor, out: torch.Tensor) -> bool | str:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or dims == []:
        return f"{name} reduces over every dim, the token dims among them"
    wanted = [dims] if isinstance(dims, int) else list(dims)
    if any(d % x.dim() != x.dim() - 1 for d in wanted):
        return (
            f"{name} works along dims {wanted} of {list(x.shape)}: "
            "across the token dims, mixing rows"
        )
    if out.dim() < x.dim() - 1 or not all(
        known_true(a == b) for a, b in zip(x.shape[:-1], out.shape)
    ):
        return f"{name} does not keep the token dims {list(x.shape[:-1])}"
    return True


def _first_tensor(node: Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        val = next((v for v in val if isinstance(v, torch.Tensor)), None)
    return val if isinstance(val, torch.Tensor) else None
