"""No-op elimination, judged on meta shapes (never on arguments: `-1` means different things to
reshape and slice)."""

from __future__ import annotations

import torch

from ..pattern import anything, op, tensor
from ..rules import Match, Rule, RuleSet

aten = torch.ops.aten

VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
x, y = tensor("x"), tensor("y")


def _shape(node) -> tuple | None:
    v = node.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _keeps_shape(m: Match) -> bool | str:
    before, after = _shape(m["x"]), _shape(m.root)
    if before is None or after is None:
        return "no shape metadata"
    return before == after or f"shape changes {list(before)} -> {list(after)}"


def _src_fills_self(m: Match) -> bool | str:
    before, src = _shape(m["x"]), _shape(m["y"])
    if before is None or src is None:
        return "no shape metadata"
    return before == src or "slice_scatter writes part of its input"


def noop_rules() -> RuleSet:
    return RuleSet("cleanup.noop", [
        # x viewed or sliced to its own shape is x.
        Rule("noop.view", op(VIEWS, x, anything()), lambda b, m: m["x"], where=_keeps_shape),
        Rule("noop.slice", op(aten.slice.Tensor, x, anything(), anything(), anything(), anything()),
             lambda b, m: m["x"], where=_keeps_shape),
        # Scattering a full-size src into x overwrites all of x.
        Rule("noop.slice_scatter",
             op(aten.slice_scatter.default, x, y, anything(), anything(), anything(), anything()),
             lambda b, m: m["y"], where=_src_fills_self),
        # view(view(x)) is one view of x.
        Rule("noop.view_chain", op(VIEWS, op(VIEWS, x, anything()), anything("shape")),
             lambda b, m: b.call(aten.reshape.default, m["x"], m["shape"])),
    ])
