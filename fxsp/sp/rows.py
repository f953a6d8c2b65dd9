"""Row arithmetic for sequence parallelism: every activation [*, H] is a stack of rows.

The token dims (all but the last) are flattened to rows, padded up to a multiple of the TP
size, split into one block per rank (the layout: layout.py), and restored
after the all-gather. Sizes may be Python ints or symbolic: symbolic ones become `sym_size` /
`operator` nodes, so the same code serves static and dynamic shapes.

The SP region lives in padded rows. Inductor's micro-pipeline TP fuses `all_gather → mm` and
`mm → reduce_scatter` only when nothing stands between the collective and its matmul, so the
pad, trim and flattening views go where they do not: a matmul feeding a reduce-scatter runs on
padded rows (the pad moves to its input, or vanishes where the input is itself a trimmed padded
value), and a matmul consuming an all-gathered value runs on the gathered padded rows, the trim
and the restored token dims moving to its output. Rows are independent in a matmul, so the real
rows are computed exactly as before; padding rows hold whatever their rows compute and are
dropped wherever a value leaves the region.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch.fx import Node

from ..dsl.builder import Builder, erase_unused
from ..dsl.fake import known_true, tensor_of
from ..dsl.pattern import VIEW
from ..ir.ops import FP8_DTYPES
from .layout import block_bounds, padded_block_rows

aten = torch.ops.aten

Size = Any  # int or an FX node producing a SymInt

# Meta key on a value fxsp trimmed from padded rows: (the padded value, TP size).
UNTRIMMED = "fxsp_untrimmed"
_MATMULS = (aten.mm.default, aten._scaled_mm.default)


def row_count(t: torch.Tensor) -> Any:
    """Rows of an activation: the product of all but the last dim (int or SymInt)."""
    rows = 1
    for d in t.shape[:-1]:
        rows = rows * d
    return rows


def pinned_by_one_row_blocks(rows: Any, tp: int) -> bool:
    """Whether SP on `rows` (symbolic) would break the compile: the example gives each rank a
    block of at most one row, torch's layout checks guard on a block of one row, and a token dim
    the user marked dynamic (`mark_dynamic`, `dynamic=True`) must not be specialised
    (ConstraintViolationError). Automatic dynamic shapes specialise freely: the guard just keeps
    larger batches for a graph compiled with SP."""
    hint = getattr(rows.node, "hint", None)
    if not isinstance(hint, int) or hint > tp:
        return False
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    shape_env = getattr(getattr(context, "fake_mode", None), "shape_env", None)
    if shape_env is None:
        return False
    sources = {
        source.name
        for symbol in rows.node.expr.free_symbols
        for source in shape_env.var_to_sources.get(symbol, ())
    }
    for tensor_context in context.tensor_to_context.values():
        name = getattr(getattr(tensor_context, "tensor_source", None), "name", None)
        for dim, constraint in enumerate(getattr(tensor_context, "constraint_sizes", None) or ()):
            strict = constraint is not None and not getattr(constraint, "warn_only", False)
            if strict and f"{name}.size()[{dim}]" in sources:
                return True
    return False


def _size(b: Builder, x: Node, dim: int) -> Size:
    """Size `dim` of `x`. A symbolic one is taken, where the graph has it, from the size
    arguments of the view or the operands of the matmul computing `x`: a `sym_size` of `x`
    would keep `x` alive after SP recomputed it on padded rows."""
    found = _size_in_graph(b, x, dim)
    return b.call(aten.sym_size.int, x, dim) if found is None else found


def _size_in_graph(b: Builder, x: Node, dim: int) -> Size | None:
    """`_size`, or None where only a `sym_size` of `x` itself would tell."""
    d = tensor_of(x).shape[dim]
    if isinstance(d, int):
        return d
    if x.target in VIEW | {aten.as_strided.default} and isinstance(x.args[1][dim], Node):
        return x.args[1][dim]
    if (
        x.target is aten.slice.Tensor
        and x.args[1:3] == (0, 0)
        and dim == 0
        and isinstance(x.args[3], Node)
    ):
        return x.args[3]
    if x.target in _MATMULS and tensor_of(x).dim() == 2:
        return _size(b, x.args[0], 0) if dim == 0 else _size(b, x.args[1], 1)
    return None


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
    tp: int

    @property
    def exact(self) -> bool:
        """The TP size divides the rows (known now): no padding rows."""
        return isinstance(self.rows, int) and self.padded == self.rows


def row_blocks(b: Builder, x: Node, tp: int) -> RowBlocks:
    shape = [_size(b, x, d) for d in range(tensor_of(x).dim())]
    rows = shape[0]
    for d in shape[1:-1]:
        rows = _arith(b, operator.mul, rows, d)
    per_rank = padded_block_rows(rows, tp, partial(_arith, b))
    return RowBlocks(rows, _arith(b, operator.mul, per_rank, tp), per_rank, shape, tp)


def shaped_like(b: Builder, blocks: RowBlocks, x: Node) -> RowBlocks:
    """`blocks` for `x`, which holds the same rows in a shape of its own ([T, H] <-> [1, T, H])."""
    t = tensor_of(x)
    if len(blocks.shape) == t.dim() and all(
        isinstance(s, int) and known_true(s == d) for s, d in zip(blocks.shape, t.shape)
    ):
        return blocks
    shape = [_size_in_graph(b, x, d) for d in range(t.dim())]
    unknown = [d for d, size in enumerate(shape) if size is None]
    if len(unknown) == 1 and unknown[0] < t.dim() - 1:
        # A token dim the graph does not spell (a view's -1): the rows over the other token
        # dims. A `sym_size` of `x` would read `x`, which SP replaces and may erase: a node
        # used before it is defined, or an all-reduce kept alive.
        others = 1
        for size in shape[:-1]:
            others = others if size is None else _arith(b, operator.mul, others, size)
        exact = isinstance(others, int) and others == 1
        shape[unknown[0]] = (
            blocks.rows if exact else _arith(b, operator.floordiv, blocks.rows, others)
        )
    return replace(blocks, shape=[_size(b, x, d) if s is None else s for d, s in enumerate(shape)])


def to_padded_rows(b: Builder, x: Node, blocks: RowBlocks, through_matmul: bool = False) -> Node:
    """[*, H] → [padded, H]. A value fxsp trimmed gives back its padded twin; with
    `through_matmul`, a matmul's result used only on the way here is recomputed on padded rows,
    so nothing stands between it and the collective; anything else gets zero rows appended."""
    source = _untrimmed(x, blocks.tp)
    if source is not None:
        return source
    if through_matmul:
        mm = _matmul_behind(x)
        if mm is not None:
            return _on_padded_rows(b, mm, blocks)
    flat = (
        x
        if tensor_of(x).dim() == 2
        else b.call(aten.view.default, x, [blocks.rows, blocks.shape[-1]])
    )
    pad = _arith(b, operator.sub, blocks.padded, blocks.rows)
    if isinstance(pad, int) and pad == 0:
        return flat
    if tensor_of(flat).dtype in FP8_DTYPES:  # zero bytes are FP8 zeros; pad the bytes
        as_bytes = b.call(aten.view.dtype, flat, torch.uint8)
        padded = b.call(aten.constant_pad_nd.default, as_bytes, [0, 0, 0, pad], 0.0)
        return b.call(aten.view.dtype, padded, tensor_of(flat).dtype)
    return b.call(aten.constant_pad_nd.default, flat, [0, 0, 0, pad], 0.0)


def from_padded_rows(b: Builder, full: Node, blocks: RowBlocks) -> Node:
    """[padded, H] → the original [*, H]: drop the padding rows, restore the token dims."""
    trimmed = trim_rows(b, full, blocks)
    if len(blocks.shape) == 2:
        return trimmed
    return b.call(aten.view.default, trimmed, list(blocks.shape))


def trim_rows(b: Builder, full: Node, blocks: RowBlocks) -> Node:
    """full[:rows], remembering `full` as the trimmed value's padded twin."""
    if blocks.exact:
        return full
    if not isinstance(blocks.rows, int):
        trimmed = _first_rows(b, full, blocks.rows)
    else:
        trimmed = b.call(aten.slice.Tensor, full, 0, 0, blocks.rows)
    trimmed.meta[UNTRIMMED] = (full, blocks.tp)
    return trimmed


def _first_rows(b: Builder, full: Node, rows: Size) -> Node:
    """full[:rows] for symbolic rows. A slice would make Dynamo and Inductor guard
    `rows <= tp * ceil(rows / tp)`, true but beyond sympy, which breaks
    `mark_dynamic(min=, max=)`; the same view stated by its strides has no bound to check."""
    t = tensor_of(full)
    if not t.is_contiguous():  # the all-gather's fresh buffer always is
        return b.call(aten.slice.Tensor, full, 0, 0, rows)
    return b.call(
        aten.as_strided.default, full, [rows, *t.shape[1:]], list(t.stride()), t.storage_offset()
    )


def this_rank_rows(b: Builder, padded: Node, blocks: RowBlocks, rank: int) -> Node:
    """This rank's block of a replicated [padded, H] value (rank-specific: see the pass uuid)."""
    start, end = block_bounds(blocks.per_rank, rank, partial(_arith, b))
    return b.call(aten.slice.Tensor, padded, 0, start, end)


def matmuls_on_padded_rows(b: Builder, full: Node, blocks: RowBlocks) -> int:
    """Point every matmul whose lhs is `full` (or `full` flattened to [rows, H]) at the padded
    rows `full` was trimmed from; the trim moves to the matmul's result. Returns how many."""
    padded = _padded_source(full, blocks)
    if padded is None:
        return 0
    moved = 0
    for lhs in [full, *(u for u in full.users if u.target in VIEW and _is_rows_of(u, full))]:
        if tensor_of(lhs).dim() != 2:
            continue
        for mm in [u for u in lhs.users if _is_matmul_on_rows(u) and u.args[0] is lhs]:
            new = b.call(mm.target, padded, *mm.args[1:], **mm.kwargs)
            b.replace(mm, trim_rows(b, new, blocks))
            erase_unused([mm])
            moved += 1
        if lhs is not full:
            erase_unused([lhs])
    return moved


# --- helpers ---------------------------------------------------------------------------------


def _views_of_rows(x: Node) -> list[Node]:
    """`x`, and back from it each value that a view keeping its rows was taken of."""
    chain = [x]
    while chain[-1].target in VIEW and _is_rows_of(chain[-1], chain[-1].args[0]):
        chain.append(chain[-1].args[0])
    return chain


def _untrimmed(x: Node, tp: int) -> Node | None:
    """The padded value `x` (or the view of it that `x` is) was trimmed from by fxsp."""
    for node in _views_of_rows(x):
        twin = node.meta.get(UNTRIMMED)
        if twin is not None and not twin[0]._erased and twin[1] == tp:
            return twin[0]
    return None


def _padded_source(full: Node, blocks: RowBlocks) -> Node | None:
    """The [padded, H] value `full` restores: its trimmed twin, or itself through views."""
    x = _views_of_rows(full)[-1]
    twin = _untrimmed(x, blocks.tp)
    if twin is not None:
        return twin
    return x if blocks.exact and tensor_of(x).dim() == 2 and x is not full else None


def _matmul_behind(x: Node) -> Node | None:
    """The matmul computing `x` through row-keeping views, when nothing else uses it on the way."""
    *views, node = _views_of_rows(x)
    if any(len(v.users) != 1 for v in views):
        return None
    if _is_matmul_on_rows(node) and len(node.users) == 1 and _is_rows_of(x, node):
        return node
    return None


def _on_padded_rows(b: Builder, mm: Node, blocks: RowBlocks) -> Node:
    """`mm` recomputed with its lhs on padded rows (`mm` itself where nothing is padded)."""
    lhs = mm.args[0]
    padded_lhs = to_padded_rows(b, lhs, blocks)
    if padded_lhs is lhs:
        return mm
    return b.call(mm.target, padded_lhs, *mm.args[1:], **mm.kwargs)


def _is_matmul_on_rows(node: Node) -> bool:
    """mm, or a scaled mm whose lhs scale is one per tensor (a row-wise scale has rows too)."""
    if node.target is aten.mm.default:
        return True
    if node.target is aten._scaled_mm.default:
        scale = tensor_of(node.args[2])
        return scale is not None and known_true(scale.numel() == 1)
    return False


def _is_rows_of(view: Node, source: Any) -> bool:
    """`view` holds the same rows as `source`: both [*, H] with the same H and row count."""
    a, b = tensor_of(view), tensor_of(source)
    if a is None or b is None or a.dim() == 0 or b.dim() == 0:
        return False
    return known_true(a.shape[-1] == b.shape[-1]) and known_true(row_count(a) == row_count(b))
