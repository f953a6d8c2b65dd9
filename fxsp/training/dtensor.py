"""Sequence parallelism for training, on Dynamo's graph of a DTensor model (docs/training.md).

A row-parallel matmul's Partial output is all-reduced (`redistribute` to Replicate, then
`to_local`) and read by the residual add and the norm. The rewrite reduce-scatters it instead,
to rows sharded over the TP group, and runs the region after it (the adds and norms, any op
that acts on each row alone) on DTensors sharded that way:

    to_local(redistribute(p, (R,)))   ⇒  redistribute(p, (Shard(rows),))
    op(region values, w)              ⇒  op(region values as DTensors, from_local(w, (R,)))
    from_local(v, (R,)) (a column-parallel input)  ⇒  redistribute(v, (R,))      all-gather
    any other reader of v             ⇒  to_local(redistribute(v, (R,)))         all-gather

AOT autograd then derives the backward from DTensor's own rules: the all-gather's backward is a
reduce-scatter of the column-parallel input's partial gradient, the reduce-scatter's an
all-gather, each norm's backward runs on this rank's rows, and a replicated weight or bias
(`from_local(w, (R,))`) gets its partial gradients summed over the TP group. DTensor pads
uneven shards. Outside the region nothing changes, so every rank's loss and gradients are eager
TP's.

All sites share one region: a residual add reads one site's rows and the next's. Before it,
`dropout(p=0)` is dropped and sums of two all-reduces fold into one (parallel blocks). A site
joins only where its region reaches a norm (a reduction over the last dim), and the graph keeps
TP where SP would send more over forward and backward (`_costs_more`). Residual dropout with
p > 0 ends a region (its masks, drawn on this rank's rows, would differ from TP's) unless the
caller accepts that (`dropout`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.fx import Graph, GraphModule, Node

try:  # Dynamo records DTensor.from_local as a call of this function from torch 2.13 on
    from torch.distributed.tensor._api import from_local
except ImportError:  # earlier, as closures with their arguments inside: nothing to rewrite
    from_local = None

from ..policy.thresholds import sp_min_tokens
from .autograd_functions import example_value, lift_autograd_collectives

# Ops that act on each row alone (on a value sharded by rows, DTensor keeps it so), by target.
ROW_WISE_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.rsqrt,
    torch.sqrt,
    torch.pow,
    torch.rms_norm,
    torch.layer_norm,
    F.rms_norm,
    F.layer_norm,
}
ROW_WISE_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "pow",
    "rsqrt",
    "sqrt",
    "to",
    "float",
    "half",
    "bfloat16",
    "type_as",
    "contiguous",
    "clone",
}
# Reductions over the last dim (a norm's statistics): row-wise, and what makes a site pay.
LAST_DIM_REDUCTIONS = {"mean", "var", torch.mean, torch.var}
NORMS = {torch.rms_norm, torch.layer_norm, F.rms_norm, F.layer_norm}


@dataclass
class TrainingReport:
    """What the rewrite of one Dynamo graph did: sites rewritten, and why others were not."""

    sites: int = 0
    folded: int = 0  # sums of two all-reduces made one (parallel attention + MLP blocks)
    lifted: int = 0  # hand-written TP collectives (autograd functions) made DTensor's
    misses: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict:
        return {"sp.train": self.sites, "sp.train_fold": self.folded}


def sequence_parallel(
    gm: GraphModule, min_tokens: int | str = 0, dropout: bool = False
) -> TrainingReport:
    """Rewrite every all-reduce → norm site of `gm` (a Dynamo graph of a DTensor model) to the
    SP form, from `min_tokens` rows ("auto": policy.thresholds); returns what was done. The
    graph is left as it was where nothing applies. `dropout`: residual dropout joins the region,
    its masks drawn on each rank's rows (they differ from TP's)."""
    graph, report = gm.graph, TrainingReport()
    if from_local is None:
        report.misses.append(
            f"torch {torch.__version__}: Dynamo records DTensor's calls as closures, which "
            "fxsp cannot rewrite; SP for training needs torch 2.13 or later"
        )
        return report
    report.lifted = lift_autograd_collectives(gm, from_local)
    _drop_identity_dropouts(graph)
    report.folded = _fold_sums(graph)
    sites, mesh = [], None
    for site in [n for n in graph.nodes if _all_reduced(n)]:
        too_few = _too_few_rows(site, min_tokens)
        if too_few:
            report.misses.append(f"{site.name}: {too_few}")
            continue
        region = _region([site], dropout)
        if not any(_reduces_last_dim(n) for n in region):
            report.misses.append(f"{site.name}: no norm on its rows: {_stop(site, region)}")
            continue
        site_mesh = _mesh_node(graph, site)
        if site_mesh is None or mesh not in (None, site_mesh):
            report.misses.append(f"{site.name}: no device mesh of its own in the graph")
            continue
        sites.append(site)
        mesh = site_mesh
    if sites:
        # One region for all sites: a residual add reads one site's rows and the next's.
        more = _costs_more(sites, mesh, dropout)
        if more:
            report.misses.append(more)
            sites = []
    if sites:
        _rewrite(graph, sites, mesh, dropout)
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    report.sites = len(sites)
    return report


def _drop_identity_dropouts(graph: Graph) -> None:
    """`F.dropout(x, p=0)` is `x`: dropped, so that it hides no sum of all-reduces."""
    for node in list(graph.find_nodes(op="call_function", target=F.dropout)):
        if _no_dropout(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _costs_more(sites: list[Node], mesh: Node, dropout: bool) -> str | None:
    """Why SP would send more than TP over forward and backward, or None. Each site's
    reduce-scatter and the all-gather of what a column-parallel module reads move the bytes of
    TP's forward all-reduce and of that module's backward all-reduce; but each site's backward
    all-gathers the gradient of its rows, so a site whose rows no column-parallel module reads
    (a replicated head after the last norm) adds that all-gather."""
    region = {*sites, *_region(sites, dropout)}
    read = {
        value
        for value in region
        for reader in value.users
        if reader not in region and _column_parallel_input(reader, mesh)
    }
    if len(read) >= len(sites):
        return None
    return (
        f"SP would send more than TP: {len(sites)} sites, whose backward all-gathers, and "
        f"{len(read)} values read by column-parallel modules, whose backward reduce-scatters "
        "instead of all-reducing"
    )


def _fold_sums(graph: Graph) -> int:
    """`a + b` and `(r + a) + b` with `a`, `b` all-reduced DTensors (parallel attention + MLP
    blocks) ⇒ one all-reduce of the Partial sum, as fxsp/ir/fold.py does after AOT autograd:
    half the bytes, and one site. Returns how many sums were folded."""
    folded = 0
    for add in list(graph.find_nodes(op="call_function", target=operator.add)):
        left, right = add.args[:2] if len(add.args) == 2 else (None, None)
        if not (isinstance(right, Node) and _all_reduced(right) and len(right.users) == 1):
            continue
        inner = None
        if isinstance(left, Node) and _all_reduced(left) and len(left.users) == 1:
            reduced = left
        elif (
            isinstance(left, Node)
            and left.target is operator.add
            and len(left.users) == 1
            and isinstance(left.args[1], Node)
            and _all_reduced(left.args[1])
            and len(left.args[1].users) == 1
        ):
            inner, reduced = left, left.args[1]
        else:
            continue
        a, b = reduced.args[0].args[0], right.args[0].args[0]
        ea, eb = example_value(a), example_value(b)
        if ea.shape != eb.shape or ea.dtype != eb.dtype:
            continue
        with graph.inserting_before(add):
            total = graph.call_function(operator.add, (a, b))
            total.meta["example_value"] = example_value(a)
            gathered = graph.call_method("redistribute", (total,), dict(right.args[0].kwargs))
            gathered.meta["example_value"] = example_value(right.args[0])
            local = graph.call_method("to_local", (gathered,))
            local.meta["example_value"] = example_value(right)
            out = (
                local
                if inner is None
                else graph.call_function(operator.add, (inner.args[0], local))
            )
            out.meta["example_value"] = example_value(add)
        add.replace_all_uses_with(out)
        graph.eliminate_dead_code()
        folded += 1
    return folded


def _too_few_rows(site: Node, min_tokens: int | str) -> str | None:
    """Why the site's rows are below the SP threshold, or None."""
    t = example_value(site)
    world = example_value(site.args[0].args[0]).device_mesh.size()
    if min_tokens == "auto":
        found = sp_min_tokens(t.shape[-1], world, t.dtype, t.device)
        if found.min_tokens is None:
            return found.reason
        min_tokens = found.min_tokens
    rows = t.numel() // t.shape[-1]
    if not isinstance(rows, int):  # symbolic rows: SP only with no threshold
        return f"symbolic rows may fall below min_tokens {min_tokens}" if min_tokens else None
    return f"{rows} rows < min_tokens {min_tokens}" if rows < int(min_tokens) else None


def _all_reduced(node: Node) -> bool:
    """`to_local(redistribute(p, (Replicate(),)))` of a DTensor `p` Partial on a 1-D mesh, with
    rows to shard (at least two dims)."""
    if node.op != "call_method" or node.target != "to_local":
        return False
    redistribute = node.args[0]
    if not (
        isinstance(redistribute, Node)
        and redistribute.op == "call_method"
        and redistribute.target == "redistribute"
    ):
        return False
    partial = example_value(redistribute.args[0])
    out = example_value(node)
    placements = redistribute.kwargs.get("placements", redistribute.args[2:3] or None)
    return (
        isinstance(partial, DTensor)
        and len(partial.placements) == 1
        and partial.placements[0].is_partial()
        and getattr(partial.placements[0], "reduce_op", "sum") == "sum"
        and tuple(placements or ()) == (Replicate(),)
        and isinstance(out, torch.Tensor)
        and out.dim() >= 2
    )


def _row_wise(node: Node, dropout: bool) -> bool:
    """Whether `node` acts on each row alone; dropout with p > 0 only if `dropout`."""
    if node.op == "call_function":
        return (
            node.target in ROW_WISE_FUNCTIONS
            or _reduces_last_dim(node)
            or _no_dropout(node)
            or (dropout and _dropout_p(node) is not None)
            or _whole(node)
        )
    if node.op == "call_method":
        return node.target in ROW_WISE_METHODS or _reduces_last_dim(node)
    return False


def _whole(node: Node) -> bool:
    """`x[:, 0:, :]`-style indexing that keeps every row and column (HF's `logits_to_keep=0`)."""
    if node.target is not operator.getitem or not isinstance(node.args[1], tuple):
        return False
    return all(
        isinstance(s, slice) and s.start in (None, 0) and s.stop is None and s.step in (None, 1)
        for s in node.args[1]
    )


def _dropout_p(node: Node) -> float | None:
    """The probability of an `F.dropout` node (None for any other node)."""
    if node.target is not F.dropout:
        return None
    return node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)


def _no_dropout(node: Node) -> bool:
    """`F.dropout` with p = 0 (the identity), as models with dropout configured off call it."""
    return _dropout_p(node) == 0


def _stop(site: Node, region: list[Node]) -> str:
    """Why a site's region reaches no norm: the first reader of it that is not row-wise."""
    inside = {site, *region}
    for node in [site, *region]:
        for reader in node.users:
            if reader not in inside and reader.op in ("call_function", "call_method"):
                name = getattr(reader.target, "__name__", str(reader.target))
                if _dropout_p(reader) is not None:
                    return (
                        f"dropout (p={_dropout_p(reader)}) reads it: masks drawn on this rank's "
                        "rows would differ from those TP draws (fxsp.backend(..., "
                        "sharded_dropout=True) accepts that)"
                    )
                return f"{reader.name} ({name}) reads it and does not act on each row alone"
    return "nothing reads it on its rows"


def _reduces_last_dim(node: Node) -> bool:
    if node.target in NORMS:
        return True
    if node.target not in LAST_DIM_REDUCTIONS or node.op not in ("call_function", "call_method"):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    value = example_value(node.args[0])
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return (
        isinstance(value, torch.Tensor)
        and len(dims) == 1
        and isinstance(dims[0], int)
        and dims[0] % value.dim() == value.dim() - 1
    )


def _region(sites: list[Node], dropout: bool) -> list[Node]:
    """The nodes after `sites` that run on their rows: row-wise ops reading a site or the
    region, in graph order."""
    region: set[Node] = set(sites)
    ordered = []
    for node in sites[0].graph.nodes:
        if (
            node not in region
            and _row_wise(node, dropout)
            and any(a in region for a in node.all_input_nodes)
        ):
            region.add(node)
            ordered.append(node)
    return ordered


def _mesh_node(graph: Graph, site: Node) -> Node | None:
    """The graph's node for the mesh of the site's DTensor (any `from_local` on it names it)."""
    mesh = example_value(site.args[0].args[0]).device_mesh
    for node in graph.find_nodes(op="call_function", target=from_local):
        if example_value(node) is not None and example_value(node).device_mesh == mesh:
            return node.args[1]
    return None


def _rewrite(graph: Graph, sites: list[Node], mesh: Node, dropout: bool) -> None:
    """The sites reduce-scattered, their region on DTensors sharded by rows, and each value
    read outside the region gathered (see the module's docstring)."""
    sharded: dict[Node, Node] = {}
    for site in sites:
        rows = Shard(example_value(site).dim() - 2)
        with graph.inserting_after(site):
            sharded[site] = graph.call_method(
                "redistribute", (site.args[0].args[0],), {"placements": (rows,)}
            )

    def as_dtensor(a: object, before: Node) -> object:
        if not isinstance(a, Node):
            return a
        if a in sharded:
            return sharded[a]
        if isinstance(example_value(a), torch.Tensor) and not isinstance(example_value(a), DTensor):
            with graph.inserting_before(before):
                return graph.call_function(
                    from_local, (a, mesh, (Replicate(),)), {"run_check": False}
                )
        return a

    for node in _region(sites, dropout):
        with graph.inserting_after(node):
            sharded[node] = graph.create_node(
                node.op,
                node.target,
                tuple(as_dtensor(a, node) for a in node.args),
                {k: as_dtensor(v, node) for k, v in node.kwargs.items()},
            )
    gathered: dict[Node, Node] = {}
    for old, new in sharded.items():
        for reader in list(old.users):
            if reader in sharded or reader is new:
                continue
            if new not in gathered:
                with graph.inserting_after(new):
                    gathered[new] = graph.call_method(
                        "redistribute", (new,), {"placements": (Replicate(),)}
                    )
            if _column_parallel_input(reader, mesh):
                reader.replace_all_uses_with(gathered[new])
                graph.erase_node(reader)
            else:
                with graph.inserting_after(gathered[new]):
                    local = graph.call_method("to_local", (gathered[new],))
                reader.replace_input_with(old, local)


def _column_parallel_input(node: Node, mesh: Node) -> bool:
    """`from_local(v, mesh, (Replicate(),))`: a column-parallel module's input, which takes the
    gathered DTensor itself (its gradient then reduce-scatters)."""
    return (
        node.op == "call_function"
        and node.target is from_local
        and node.args[1:2] == (mesh,)
        and tuple(node.args[2] if len(node.args) > 2 else node.kwargs.get("placements", ()))
        == (Replicate(),)
    )
