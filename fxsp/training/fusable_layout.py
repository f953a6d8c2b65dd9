"""DTensor's sequence-sharded collectives, laid out the way micro-pipeline TP fuses them.

This is async TP for training graphs (docs/training.md). In the forward and backward graphs AOT
autograd makes of a DTensor model, a collective on the token dim d of [B, S, H] comes with the
ops that lay it out:
- a reduce-scatter reads the matmul's output split on d and re-catted on dim 0;
- an all-gather's output is split and catted back on d;
- uneven shards add zero rows before (DTensor pads each chunk apart) and a trim after;
- the matmuls reshape their operands from and to whatever the model viewed them as, such as
  attention's [B, S, heads, head_dim].

Micro-pipeline TP fuses `mm → reduce-scatter` and `all-gather → mm` only where the matmul makes
or reads the collective's value itself. It also takes the reduce-scatter's matmul operand as
[*token dims, K] without checking it: a 4-D operand breaks the compile. So this module makes
these rewrites, each giving the same values (the last up to the order of its sums):

    cat(x's chunks, the last padded with zero rows)  ⇒  pad(x)
    pad(A @ W)                                       ⇒  pad(A) @ W        (zero rows stay zero)
    trim(gathered) @ W                               ⇒  trim(gathered @ W)  (rows are independent)
    reshape(reshape(A, [M, K]) @ W, shape)           ⇒  via A as [*token dims, K], and the
                                                        product as [*token dims, N]
    A1 @ W1 + A2 @ W2  (backward)                    ⇒  cat([A1, A2], 1) @ cat([W1, W2], 0)

fxsp/sp/rows.py does the same for the inference rewrite, on rows flattened to dim 0.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import Graph, Node

from ..dsl.builder import Builder, erase_unused
from ..dsl.fake import tensor_of
from ..ir.collectives import C10D_ALL_GATHER, C10D_REDUCE_SCATTER, WAIT

aten = torch.ops.aten
SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)
# DTensor's layout of a collective on a token dim other than 0: split by rank, cat on the dim.
TOKEN_DIM_LAYOUT = (*SPLITS, operator.getitem, aten.cat.default)


def lay_out_for_fusion(graph: Graph) -> int:
    """Rewrite `graph` in place as above; returns how many rewrites were made. A graph on
    symbolic sizes is left as it is: these rewrites state sizes as numbers (and DTensor's
    training graphs on symbolic rows do not compile in torch 2.13 anyway, docs/training.md)."""
    if _symbolic(graph):
        return 0
    b = Builder(graph)
    done = 0
    for cat in list(graph.find_nodes(op="call_function", target=aten.cat.default)):
        done += _one_pad(b, cat)
    if _is_backward(graph):
        for scatter in list(graph.find_nodes(op="call_function", target=C10D_REDUCE_SCATTER)):
            done += _one_matmul_for_sum(b, scatter)
    for pad in list(graph.find_nodes(op="call_function", target=aten.constant_pad_nd.default)):
        if not pad._erased and _reaches_reduce_scatter(pad):
            done += _pad_before_matmul(b, pad)
    for gather in list(graph.find_nodes(op="call_function", target=C10D_ALL_GATHER)):
        gathered = _gathered(gather)
        if gathered is not None:
            done += _matmuls_before_trims(b, gathered)
            done += sum(_token_dims_after(b, mm, gathered) for mm in _lhs_matmuls(gathered))
    for scatter in list(graph.find_nodes(op="call_function", target=C10D_REDUCE_SCATTER)):
        done += _token_dims_before(b, scattered(scatter))
    if done:
        graph.eliminate_dead_code()
        graph.lint()
    return done


def _symbolic(graph: Graph) -> bool:
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) or (
            isinstance(val, torch.Tensor) and not all(isinstance(d, int) for d in val.shape)
        ):
            return True
    return False


# --- uneven shards: DTensor's padded chunks -----------------------------------------------------


def _one_pad(b: Builder, cat: Node) -> int:
    """`cat([x's chunks on dim d, the last ones padded with zero rows], d)` ⇒ `pad(x)`."""
    found = _padded_chunks(cat)
    if found is None:
        return 0
    x, dim, rows = found
    b.replace(cat, b.call(aten.constant_pad_nd.default, x, _end_pad(tensor_of(x), dim, rows), 0.0))
    erase_unused([cat], inputs=True)
    return 1


def _padded_chunks(cat: Node) -> tuple[Node, int, int] | None:
    """(x, d, zero rows appended) where `cat` is x's chunks on d in order, then zero rows."""
    dim = _dim(cat, 1)
    if not isinstance(cat.args[0], (list, tuple)) or tensor_of(cat) is None:
        return None
    dim %= tensor_of(cat).dim()
    split, taken, appended = None, 0, 0
    for piece in cat.args[0]:
        inner, rows = _zero_rows_after(_unclone(piece), dim)
        inner = _unclone(inner)
        chunk = _chunk(inner, dim)
        if chunk is not None:  # the next chunk of x, before any zero row
            if appended or chunk[1] != taken or split not in (None, chunk[0]):
                return None
            split, taken = chunk[0], taken + 1
        elif _zeros(inner):
            rows += tensor_of(inner).shape[dim]
        elif not _empty_on(inner, dim):  # DTensor pads an empty chunk where x has too few rows
            return None
        appended += rows
    if split is None or appended == 0 or taken != len(split.meta.get("val", ())):
        return None
    x = split.args[0]
    if tensor_of(x).shape[dim] + appended != tensor_of(cat).shape[dim]:
        return None
    return x, dim, appended


def _zero_rows_after(node: Node, dim: int) -> tuple[Node, int]:
    """(what `node` pads, zero rows it appends on `dim`), or (`node`, 0) if it is no such pad."""
    if node.target is not aten.constant_pad_nd.default:
        return node, 0
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    pad, ndim = list(node.args[1]), tensor_of(node).dim()
    at = 2 * (ndim - 1 - dim) + 1  # constant_pad_nd lists (before, after) from the last dim
    rest = pad[:at] + pad[at + 1 :]
    if value != 0 or at >= len(pad) or any(p != 0 for p in rest) or pad[at] <= 0:
        return node, 0
    return node.args[0], pad[at]


def _end_pad(t: torch.Tensor, dim: int, rows: int) -> list:
    pad = [0] * (2 * (t.dim() - dim))
    pad[-1] = rows
    return pad


def _chunk(node: Node, dim: int) -> tuple[Node, int] | None:
    """(the split on `dim`, index) where `node` is one of its outputs."""
    if node.target is not operator.getitem or not isinstance(node.args[0], Node):
        return None
    split = node.args[0]
    if split.target not in SPLITS or _dim(split, 2) % tensor_of(split.args[0]).dim() != dim:
        return None
    return split, node.args[1]


def _empty_on(node: Node, dim: int) -> bool:
    t = tensor_of(node)
    return t is not None and t.shape[dim] == 0


def _zeros(node: Node) -> bool:
    return node.target is aten.full.default and node.args[1] == 0


def _unclone(node: Node) -> Node:
    while isinstance(node, Node) and node.target is aten.clone.default:
        node = node.args[0]
    return node


def _dim(node: Node, at: int) -> int:
    return node.args[at] if len(node.args) > at else node.kwargs.get("dim", 0)


# --- the reduce-scatter side ------------------------------------------------------------------


def _reaches_reduce_scatter(node: Node) -> bool:
    """`node` is scattered: read by a reduce-scatter directly or through DTensor's split / cat."""
    frontier = [node]
    for _ in range(4):  # pad → split → getitem → cat → reduce-scatter
        frontier = [u for n in frontier for u in n.users]
        if any(u.target is C10D_REDUCE_SCATTER for u in frontier):
            return True
        frontier = [u for u in frontier if u.target in TOKEN_DIM_LAYOUT]
    return False


def _pad_before_matmul(b: Builder, pad: Node) -> int:
    """`pad(A @ W)` ⇒ `pad(A) @ W`, the matmul read as [*token dims, K] (see the module)."""
    product = pad.args[0]
    token_dims = range(tensor_of(product).dim() - 1)
    mm = _matmul_of(product)
    if mm is None or len(product.users) != 1:
        return 0
    if not any(_zero_rows_after(pad, d)[1] for d in token_dims):
        return 0
    lhs = _lhs_on_token_dims(b, mm, tensor_of(product).shape[:-1])
    padded_lhs = b.call(aten.constant_pad_nd.default, lhs, pad.args[1], 0.0)
    b.replace(pad, _matmul_on_token_dims(b, padded_lhs, mm))
    erase_unused([pad], inputs=True)
    return 1


def _is_backward(graph: Graph) -> bool:
    """A backward graph: AOT autograd names its incoming gradients `tangents_*`."""
    return any(p.name.startswith("tangents") for p in graph.find_nodes(op="placeholder"))


def _one_matmul_for_sum(b: Builder, scatter: Node) -> int:
    """`A1 @ W1 + A2 @ W2 + …` ⇒ `cat([A1, A2, …], 1) @ cat([W1, W2, …], 0)`, where a
    backward reduce-scatter sums it (the input gradients of separate projections, q/k/v or
    gate/up): one matmul for it to fuse with. The weights' concatenation is a copy each call,
    small beside a training step's matmuls; a forward's sums (parallel blocks, folded) are left
    as they are, for inference's sake, until a GPU says what the copy costs there."""
    value = scattered(scatter)
    root = value.args[0] if value.target is aten.constant_pad_nd.default else value
    terms = _summed_matmuls(root)
    if terms is None or len(terms) < 2:
        return 0
    lhs = b.call(aten.cat.default, [a for a, _ in terms], 1)
    rhs = b.call(aten.cat.default, [w for _, w in terms], 0)
    product = b.call(aten.mm.default, lhs, rhs)
    if tensor_of(root).dim() != 2:
        product = b.call(aten.reshape.default, product, list(tensor_of(root).shape))
    b.replace(root, product)
    erase_unused([root], inputs=True)
    return 1


def _summed_matmuls(node: Node) -> list[tuple[Node, Node]] | None:
    """[(A_i, W_i)] where `node` is the sum of the 2-D products A_i @ W_i in its own shape, each
    product and partial sum read only there; None otherwise. `addmm(c, a, b)` is `c + a @ b`
    (Inductor's spelling of a sum of two 2-D matmuls)."""
    t = tensor_of(node)
    if node.target is aten.add.Tensor and len(node.args) == 2 and not node.kwargs:
        terms = [_term(a, t) for a in node.args]
    elif node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        terms = [_term(node.args[0], t), [(node.args[1], node.args[2])]]
    else:
        mm = _matmul_of(node)
        return None if mm is None else [(mm.args[0], mm.args[1])]
    if any(term is None for term in terms):
        return None
    found = [pair for term in terms for pair in term]
    lhs, rhs = [tensor_of(a) for a, _ in found], [tensor_of(w) for _, w in found]
    if len({(x.shape[0], x.dtype) for x in lhs}) != 1 or len({w.dtype for w in rhs}) != 1:
        return None
    if any(x.dim() != 2 or w.dim() != 2 or w.shape[1] != rhs[0].shape[1] for x, w in zip(lhs, rhs)):
        return None
    return found


def _term(node: object, of: torch.Tensor) -> list | None:
    """`_summed_matmuls` of a term of a sum shaped `of`, read by that sum alone."""
    if not isinstance(node, Node) or len(node.users) != 1 or tensor_of(node) is None:
        return None
    if tuple(tensor_of(node).shape) != tuple(of.shape):
        return None
    return _summed_matmuls(node)


def scattered(scatter: Node) -> Node:
    """What the reduce-scatter sums: its input, or what DTensor split on a token dim for it."""
    value = scatter.args[0]
    if value.target is aten.cat.default:
        pieces = value.args[0]
        splits = {p.args[0] for p in pieces if p.target is operator.getitem}
        if len(splits) == 1 and all(p.target is operator.getitem for p in pieces):
            (split,) = splits
            if split.target in SPLITS:
                return split.args[0]
    return value


def _token_dims_before(b: Builder, product: Node) -> int:
    """`reshape(reshape(A, [M, K]) @ W, shape)` with A not [*shape[:-1], K] ⇒ A reshaped so."""
    mm = _matmul_of(product)
    if mm is None or product is mm:
        return 0
    source = _lhs_source(mm)
    lhs = _lhs_on_token_dims(b, mm, tensor_of(product).shape[:-1])
    if lhs is source:
        return 0
    mm.args[0].replace_input_with(source, lhs)
    return 1


# --- the all-gather side ----------------------------------------------------------------------


def _gathered(gather: Node) -> Node | None:
    """The gathered value: the wait, or DTensor's cat of its split on a token dim."""
    waits = [u for u in gather.users if u.target is WAIT]
    if len(waits) != 1:
        return None
    wait = waits[0]
    splits = [u for u in wait.users if u.target in SPLITS]
    if len(splits) == 1 and len(wait.users) == 1:
        cats = {u for g in splits[0].users for u in g.users if u.target is aten.cat.default}
        return cats.pop() if len(cats) == 1 else None
    return wait


def _matmuls_before_trims(b: Builder, gathered: Node) -> int:
    """`trim(gathered) @ W` ⇒ `trim(gathered @ W)` for each matmul reading the trimmed rows as
    its lhs (through a view of the token dims before the trim, and a contiguous copy and the
    reshape to 2-D after)."""
    moved = 0
    views = [gathered, *(u for u in gathered.users if _keeps_rows(u, gathered))]
    for view, trim in [(v, u) for v in views for u in v.users if _trims(u)]:
        for mm in _lhs_matmuls(trim):
            product = _matmul_on_token_dims(b, gathered, mm)
            if view is not gathered:
                n = tensor_of(product).shape[-1]
                product = b.call(aten.reshape.default, product, [*tensor_of(view).shape[:-1], n])
            trimmed = b.call(aten.slice.Tensor, product, trim.args[1], 0, trim.args[3])
            b.replace(mm, b.call(aten.reshape.default, trimmed, list(tensor_of(mm).shape)))
            erase_unused([mm], inputs=True)
            moved += 1
    return moved


def _trims(node: Node) -> bool:
    """`x[..., :n, ...]` on a token dim."""
    return (
        node.target is aten.slice.Tensor
        and len(node.args) >= 4
        and node.args[1] % tensor_of(node).dim() != tensor_of(node).dim() - 1
        and node.args[2] == 0
        and (len(node.args) < 5 or node.args[4] == 1)
    )


def _keeps_rows(view: Node, x: Node) -> bool:
    """`view` is `x` with its token dims reshaped (Inductor's spelling of DTensor's cat on the
    token dim where the dims before it are 1)."""
    a, b = tensor_of(view), tensor_of(x)
    return (
        view.target in (aten.reshape.default, aten.view.default)
        and a.dim() > 2
        and a.shape[-1] == b.shape[-1]
    )


def _lhs_matmuls(value: Node) -> list[Node]:
    """The matmuls whose lhs is `value` as 2-D rows: itself, or through a contiguous copy and a
    reshape."""
    readers = [value, *(u for u in value.users if u.target is aten.clone.default)]
    rows = [r for r in readers if tensor_of(r).dim() == 2]
    rows += [u for r in readers for u in r.users if _to_rows(u)]
    return [u for r in rows for u in r.users if u.target is aten.mm.default and u.args[0] is r]


def _token_dims_after(b: Builder, mm: Node, gathered: Node) -> int:
    """`reshape(reshape(gathered, [M, K]) @ W, shape)` with `shape` other than [*token dims, N]
    ⇒ via [*token dims, N]."""
    lead = list(tensor_of(gathered).shape[:-1])
    if len(lead) == 1:
        return 0
    done = 0
    for post in [u for u in mm.users if u.target is aten.reshape.default]:
        if list(tensor_of(post).shape[:-1]) != lead:
            on_token_dims = b.call(aten.reshape.default, mm, [*lead, tensor_of(mm).shape[-1]])
            b.replace(post, b.call(aten.reshape.default, on_token_dims, list(post.args[1])))
            erase_unused([post])
            done += 1
    return done


# --- matmuls on token dims --------------------------------------------------------------------


def _matmul_of(product: Node) -> Node | None:
    """The mm computing `product`: itself, or the mm whose rows it views on token dims."""
    if product.target is aten.mm.default:
        return product
    if product.target in (aten.reshape.default, aten.view.default):
        mm = product.args[0]
        if (
            mm.target is aten.mm.default
            and len(mm.users) == 1
            and tensor_of(product).shape[-1] == tensor_of(mm).shape[-1]
        ):
            return mm
    return None


def _lhs_source(mm: Node) -> Node:
    """The mm's lhs before its reshape to 2-D."""
    lhs = mm.args[0]
    return lhs.args[0] if _to_rows(lhs) else lhs


def _to_rows(node: Node) -> bool:
    return node.target in (aten.reshape.default, aten.view.default) and tensor_of(node).dim() == 2


def _lhs_on_token_dims(b: Builder, mm: Node, lead) -> Node:
    """The mm's lhs as [*lead, K], from what it was reshaped from."""
    source, k = _lhs_source(mm), tensor_of(mm.args[0]).shape[-1]
    if tuple(tensor_of(source).shape) == (*lead, k):
        return source
    return b.call(aten.reshape.default, source, [*lead, k])


def _matmul_on_token_dims(b: Builder, lhs: Node, mm: Node) -> Node:
    """`mm` recomputed on `lhs` [*token dims, K]: reshape to 2-D, mm, reshape back."""
    t = tensor_of(lhs)
    if t.dim() == 2:
        return b.call(mm.target, lhs, *mm.args[1:], **mm.kwargs)
    rows = b.call(aten.reshape.default, lhs, [math.prod(t.shape[:-1]), t.shape[-1]])
    product = b.call(mm.target, rows, *mm.args[1:], **mm.kwargs)
    return b.call(aten.reshape.default, product, [*t.shape[:-1], tensor_of(mm).shape[-1]])
