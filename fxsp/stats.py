"""What a graph moves and normalises: collective bytes and norm rows, read off `meta["val"]`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Graph

from .collectives import COMMUNICATING, kind
from .ir.fused_ops import FUSED_IR_OPS
from .ir.ops import ALL_REDUCE, FUSED_ADD_RMS_NORM, RMS_NORM

_IR_ALL_REDUCES = frozenset({ALL_REDUCE, *FUSED_IR_OPS})  # fxsp's own ops that all-reduce


@dataclass
class Traffic:
    """One rank's view of a graph: payload bytes per collective kind (the full tensor an
    all-reduce or reduce-scatter takes in, the full tensor an all-gather hands out), and the
    rows each norm normalises and each fused add+norm keeps of the residual stream."""

    bytes: dict = field(default_factory=dict)
    sites: int = 0  # all-reduces, or the reduce-scatters that replaced them
    norm_rows: list = field(default_factory=list)
    residual_rows: list = field(default_factory=list)

    def sent_per_rank(self, tp: int) -> float:
        """Bytes each rank sends, ring algorithms: an all-reduce sends 2(tp-1)/tp of its
        payload, a reduce-scatter or an all-gather (tp-1)/tp."""
        share = (tp - 1) / tp
        return sum(v * share * (2 if k == "all_reduce" else 1) for k, v in self.bytes.items())

    def per_layer(self, tp: int) -> str:
        """Averages per all-reduce site and per norm: what one such block costs each rank."""
        sites = max(self.sites, 1)
        moved = " + ".join(f"{k} {v / sites / 1024:.2f} KiB" for k, v in sorted(self.bytes.items()))
        return (f"payload {moved or 'none'} (sent {self.sent_per_rank(tp) / sites / 1024:.2f} KiB); "
                f"norm rows {_mean(self.norm_rows)}, residual rows {_mean(self.residual_rows)}")


def traffic(graph: Graph) -> Traffic:
    out = Traffic()
    for node in graph.nodes:
        what = "all_reduce" if node.target in _IR_ALL_REDUCES else kind(node)
        if what in COMMUNICATING:
            t = (node if what == "all_gather" else node.args[0]).meta.get("val")
            if isinstance(t, torch.Tensor):
                out.bytes[what] = out.bytes.get(what, 0) + _int(t.numel()) * t.element_size()
            out.sites += what != "all_gather"
        if node.target in (RMS_NORM, FUSED_ADD_RMS_NORM):
            t = node.args[0].meta.get("val")
            if isinstance(t, torch.Tensor):
                rows = _int(t.numel()) // max(_int(t.shape[-1]), 1)
                out.norm_rows.append(rows)
                if node.target is FUSED_ADD_RMS_NORM:
                    out.residual_rows.append(rows)
    return out


def collective_signature(graph: Graph) -> list:
    """The collectives a graph runs, in order: what every rank of the group must run alike."""
    from .golden import _value_type
    from .pattern import target_name

    groups: dict = {}
    out = []
    for node in graph.nodes:
        if kind(node) not in (None, "wait"):
            group = next((a for a in node.args if isinstance(a, str) and a not in ("sum", "avg")), "")
            out.append((target_name(node.target), _value_type(node.meta.get("val")),
                        groups.setdefault(group, len(groups))))
    return out


def _mean(values: list) -> str:
    return f"{sum(values) / len(values):.1f}" if values else "-"


def _int(n) -> int:
    """A size as an int; a symbolic size counts at its hint (the example input's size)."""
    if isinstance(n, int):
        return n
    hint = getattr(n.node, "hint", None)
    return int(hint) if hint is not None else 0
