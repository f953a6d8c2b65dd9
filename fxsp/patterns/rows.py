"""Row arithmetic for sequence parallelism: every activation [*, H] is a stack of rows.

The token dims (all but the last) are flattened to rows, padded up to a multiple of the TP
size, split into one block per rank, and restored after the all-gather. Sizes may be Python
ints or symbolic: symbolic ones become `sym_size` / `operator` nodes, so the same code serves
static and dynamic shapes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from ..builder import Builder
from ..fake import tensor_of

aten = torch.ops.aten

Size = Any  # int or an FX node producing a SymInt


def row_count(t: torch.Tensor) -> Any:
    """Rows of an activation: the product of all but the last dim (int or SymInt)."""
    rows = 1
    for d in t.shape[:-1]:
        rows = rows * d
    return rows


def _size(b: Builder, x: Node, dim: int) -> Size:
    d = tensor_of(x).shape[dim]
    return d if isinstance(d, int) else b.call(aten.sym_size.int, x, dim)


def _arith(b: Builder, fn: Any, *args: Size) -> Size:
    """fn(*args) now when all are ints, else as a node evaluated at run time."""
    if all(isinstance(a, int) for a in args):
        return fn(*args)
    return b.call(fn, *args)


@dataclass
class RowBlocks:
    """How one activation is laid out across the TP ranks: `rows` real rows padded to
    `padded` = tp * `per_rank`, each rank holding one block of `per_rank` rows."""

    rows: Size
    padded: Size
    per_rank: Size
    shape: list  # the original shape, sizes as ints or nodes

    def padding(self, b: Builder) -> Size:
        return _arith(b, operator.sub, self.padded, self.rows)


def row_blocks(b: Builder, x: Node, tp: int) -> RowBlocks:
    shape = [_size(b, x, d) for d in range(tensor_of(x).dim())]
    rows = shape[0]
    for d in shape[1:-1]:
        rows = _arith(b, operator.mul, rows, d)
    per_rank = _arith(b, operator.floordiv, _arith(b, operator.add, rows, tp - 1), tp)
    return RowBlocks(rows, _arith(b, operator.mul, per_rank, tp), per_rank, shape)


def to_padded_rows(b: Builder, x: Node, blocks: RowBlocks) -> Node:
    """[*, H] → [padded, H], zero rows appended where the TP size does not divide the rows."""
    flat = x if tensor_of(x).dim() == 2 else b.call(aten.view.default, x, [blocks.rows, blocks.shape[-1]])
    pad = blocks.padding(b)
    if isinstance(pad, int) and pad == 0:
        return flat
    return b.call(aten.constant_pad_nd.default, flat, [0, 0, 0, pad], 0.0)


def from_padded_rows(b: Builder, full: Node, blocks: RowBlocks) -> Node:
    """[padded, H] → the original [*, H]: drop the padding rows, restore the token dims."""
    if not isinstance(blocks.rows, int):
        full = _first_rows(b, full, blocks.rows)
    elif blocks.padded != blocks.rows:
        full = b.call(aten.slice.Tensor, full, 0, 0, blocks.rows)
    if len(blocks.shape) == 2:
        return full
    return b.call(aten.view.default, full, list(blocks.shape))


def _first_rows(b: Builder, full: Node, rows: Size) -> Node:
    """full[:rows] for symbolic rows. A slice would make Dynamo and Inductor guard
    `rows <= tp * ceil(rows / tp)`, true but beyond sympy, which breaks
    `mark_dynamic(min=, max=)`; the same view stated by its strides has no bound to check."""
    t = tensor_of(full)
    if not t.is_contiguous():  # the all-gather's fresh buffer always is
        return b.call(aten.slice.Tensor, full, 0, 0, rows)
    return b.call(aten.as_strided.default, full, [rows, *t.shape[1:]], list(t.stride()),
                  t.storage_offset())


def this_rank_rows(b: Builder, padded: Node, blocks: RowBlocks, rank: int) -> Node:
    """This rank's block of a replicated [padded, H] value (rank-specific: see the pass uuid)."""
    start = _arith(b, operator.mul, blocks.per_rank, rank)
    end = _arith(b, operator.add, start, blocks.per_rank)
    return b.call(aten.slice.Tensor, padded, 0, start, end)
