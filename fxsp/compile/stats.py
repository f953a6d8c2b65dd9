"""What a graph moves and normalises: collective bytes and norm rows, read off `meta["val"]`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch.fx import Graph, Node

from ..ir.collectives import C10D_ALL_GATHER, C10D_REDUCE_SCATTER, COMMUNICATING, WAIT, kind
from ..ir.fused_ops import FUSED_IR_OPS
from ..ir.ops import ALL_REDUCE, FUSED_ADD_NORMS, NORMS
from ..training.fusable_layout import TOKEN_DIM_LAYOUT, scattered

# fxsp's own ops that all-reduce, by id (ops are singletons; an op's __hash__ is Python code,
# and the walk below asks of every node)
_IR_ALL_REDUCES = frozenset(map(id, (ALL_REDUCE, *FUSED_IR_OPS)))


@dataclass
class Traffic:
    """One rank's view of a graph: payload bytes per collective kind (the full tensor an
    all-reduce or reduce-scatter takes in, the full tensor an all-gather hands out), and the
    rows each norm normalises and each fused add+norm keeps of the residual stream."""

    bytes: dict = field(default_factory=dict)
    sites: int = 0  # all-reduces, or the reduce-scatters that replaced them
    norm_rows: list = field(default_factory=list)
    residual_rows: list = field(default_factory=list)

    def __str__(self) -> str:
        return " + ".join(f"{k} {v} B" for k, v in sorted(self.bytes.items())) or "none"

    def sending(self, other: Traffic) -> Traffic:
        """These norms, with the collectives of `other` (the graph before a rewrite of them)."""
        return replace(self, bytes=other.bytes, sites=other.sites)

    def sent_per_rank(self, tp: int) -> float:
        """Bytes each rank sends, ring algorithms: an all-reduce sends 2(tp-1)/tp of its
        payload, a reduce-scatter or an all-gather (tp-1)/tp."""
        share = (tp - 1) / tp
        return sum(v * share * (2 if k == "all_reduce" else 1) for k, v in self.bytes.items())

    def per_layer(self, tp: int) -> str:
        """Averages per all-reduce site and per norm: what one such block costs each rank."""
        sites = max(self.sites, 1)
        moved = " + ".join(f"{k} {v / sites / 1024:.2f} KiB" for k, v in sorted(self.bytes.items()))
        return (
            f"payload {moved or 'none'} (sent {self.sent_per_rank(tp) / sites / 1024:.2f} KiB); "
            f"norm rows {_mean(self.norm_rows)}, residual rows {_mean(self.residual_rows)}"
        )


def traffic(graph: Graph) -> Traffic:
    out = Traffic()
    for node in graph.nodes:
        what = kind(node)
        if what is None and id(node.target) in _IR_ALL_REDUCES:
            what = "all_reduce"
        if what in COMMUNICATING:
            t = (node if what == "all_gather" else node.args[0]).meta.get("val")
            if isinstance(t, torch.Tensor):
                out.bytes[what] = out.bytes.get(what, 0) + _int(t.numel()) * t.element_size()
            out.sites += what != "all_gather"
        if node.target in NORMS or node.target in FUSED_ADD_NORMS:
            t = node.args[0].meta.get("val")
            if isinstance(t, torch.Tensor):
                rows = _int(t.numel()) // max(_int(t.shape[-1]), 1)
                out.norm_rows.append(rows)
                if node.target in FUSED_ADD_NORMS:
                    out.residual_rows.append(rows)
    return out


def collective_signature(graph: Graph) -> list:
    """The collectives a graph runs, in order: what every rank of the group must run alike."""
    from ..dsl.golden import _value_type
    from ..dsl.pattern import target_name

    groups: dict = {}
    out = []
    for node in graph.nodes:
        if kind(node) not in (None, "wait"):
            group = next(
                (a for a in node.args if isinstance(a, str) and a not in ("sum", "avg")), ""
            )
            out.append(
                (
                    target_name(node.target),
                    _value_type(node.meta.get("val")),
                    groups.setdefault(group, len(groups)),
                )
            )
    return out


def _mean(values: list) -> str:
    return f"{sum(values) / len(values):.1f}" if values else "-"


def _int(n) -> int:
    """A size as an int; a symbolic size counts at its hint (the example input's size)."""
    if isinstance(n, int):
        return n
    hint = getattr(n.node, "hint", None)
    return int(hint) if hint is not None else 0


# --- async TP coverage ----------------------------------------------------------------------------
# Inductor's micro-pipeline TP fuses `all_gather → mm` and `mm → reduce_scatter` only when
# nothing stands between the collective and its matmul. A site is *fusable* when the two are
# joined through row-layout plumbing alone (what a vLLM-style padded graph would not have), and
# *fused* when micro-pipeline TP turned it into a symm_mem op.

aten = torch.ops.aten
_MATMULS = {aten.mm.default, aten._scaled_mm.default}
_PLUMBING = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.slice.Tensor,
    aten.as_strided.default,
    aten.constant_pad_nd.default,
    aten.view.dtype,
}
_FUSED_ALL_GATHER = ("fused_all_gather_matmul", "fused_all_gather_scaled_matmul")
_FUSED_REDUCE_SCATTER = ("fused_matmul_reduce_scatter", "fused_scaled_matmul_reduce_scatter")


@dataclass
class AsyncTPSites:
    """Micro-pipeline TP coverage of one graph, read after the fusion ran."""

    fusable: int = 0
    fused: int = 0
    blocked: list = field(default_factory=list)  # why each fusable, unfused site was not fused

    def __str__(self) -> str:
        return f"async TP: {self.fused} of {self.fusable} fusable sites fused"


def async_tp_sites(graph: Graph) -> AsyncTPSites:
    """Count fused and fusable-but-unfused collective sites of a graph after micro-pipeline TP."""
    out = AsyncTPSites()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", "")
        if _is_symm_mem(node.target) and name.startswith(_FUSED_ALL_GATHER + _FUSED_REDUCE_SCATTER):
            out.fused += 1
        elif node.target is C10D_ALL_GATHER:
            why = _all_gather_blocker(node)
            if why is not None:
                out.blocked.append(why)
        elif node.target is C10D_REDUCE_SCATTER:
            why = _reduce_scatter_blocker(node)
            if why is not None:
                out.blocked.append(why)
    out.fusable = out.fused + len(out.blocked)
    return out


def _is_symm_mem(target) -> bool:
    return getattr(target, "namespace", None) == "symm_mem"


def _all_gather_blocker(gather) -> str | None:
    """Why an all-gather that reaches a matmul's lhs through plumbing is not fused; None when
    no matmul consumes it (nothing to fuse)."""
    waits = [u for u in gather.users if u.target is WAIT]
    for wait in waits:
        # (value, first node between the gather and a matmul, or None while directly after)
        stack = [(wait, None)]
        while stack:
            value, between = stack.pop()
            for user in value.users:
                if user.target in _MATMULS and user.args[0] is value:
                    return f"all_gather {gather.name} → {user.name}: " + (
                        f"{_op_name(between)} {between.name} sits between"
                        if between is not None
                        else "direct, but not fused (symmetric memory off for the group?)"
                    )
                if user.target in TOKEN_DIM_LAYOUT:  # DTensor's, which the fusion reads
                    stack.append((user, between))
                elif user.target in _PLUMBING:
                    first = (
                        between if between is not None or user.target is aten.view.dtype else user
                    )
                    stack.append((user, first))
    return None


def _reduce_scatter_blocker(scatter) -> str | None:
    """Why a reduce-scatter whose input comes from a matmul through plumbing (or DTensor's split
    and cat on a token dim) is not fused; None when its input is no matmul's output."""

    value, between = _behind_plumbing(scattered(scatter))
    summed = _matmuls_summed(value)
    if summed > 1:
        return (
            f"{_op_name(value)} {value.name} → reduce_scatter {scatter.name}: it sums "
            f"{summed} matmuls, and micro-pipeline TP fuses a reduce-scatter with one"
        )
    if not (isinstance(value, Node) and value.target in _MATMULS):
        return None
    where = f"{value.name} → reduce_scatter {scatter.name}: "
    if between is not None:
        return where + f"{_op_name(between)} {between.name} sits between"
    if len(value.users) > 1:
        return where + f"the matmul's result has {len(value.users)} users"
    return where + "direct, but not fused (symmetric memory off for the group?)"


def _behind_plumbing(value) -> tuple:
    """(what `value` is plumbing of, the first plumbing node on the way or None)."""
    between = None
    while isinstance(value, Node) and value.target in _PLUMBING:
        between = value if between is None else between
        value = value.args[0]
    return value, between


def _matmuls_summed(value) -> int:
    """How many matmuls an add tree sums (through plumbing), or 0 where a term is no matmul.
    `addmm(c, a, b)` is `c + a @ b` (Inductor's spelling of a sum of two 2-D matmuls)."""
    if not isinstance(value, Node) or value.target not in (aten.add.Tensor, aten.addmm.default):
        return 0
    count = 1 if value.target is aten.addmm.default else 0
    for term in value.args[: 2 - count]:
        term = _behind_plumbing(term)[0]
        inner = 1 if isinstance(term, Node) and term.target in _MATMULS else _matmuls_summed(term)
        if inner == 0:
            return 0
        count += inner
    return count


def _op_name(node) -> str:
    from ..dsl.pattern import target_name

    return target_name(node.target)
