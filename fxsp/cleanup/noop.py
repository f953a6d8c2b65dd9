"""No-op elimination, judged on meta shapes (never on arguments: `-1` means different things to
reshape and slice)."""

from __future__ import annotations

import torch

from ..dsl.fake import is_reshape_of, same_shape, tensor_of
from ..dsl.pattern import anything, op, such_that, tensor
from ..dsl.rules import Match, Rule, RuleSet

aten = torch.ops.aten

VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
x, y = tensor("x"), tensor("y")


def _same(a, b) -> bool:
    va, vb = tensor_of(a), tensor_of(b)
    return va is not None and vb is not None and same_shape(va, vb)


def _keeps_input_shape(node) -> bool:
    return _same(node.args[0], node)


def _keeps_shape(m: Match) -> bool | str:
    if _same(m["x"], m.root):
        return True
    return f"shape {_shape_text(m['x'])} -> {_shape_text(m.root)} is not provably the same"


def _src_fills_self(m: Match) -> bool | str:
    return _same(m["x"], m["y"]) or "slice_scatter writes part of its input"


def _shape_text(node) -> str:
    v = tensor_of(node)
    return "unknown" if v is None else str(list(v.shape))


def _one_view(b, m: Match):
    if _same(m["x"], m.root):
        return m["x"]
    root, x = tensor_of(m.root), tensor_of(m["x"])
    if root is not None and x is not None and is_reshape_of(root, x):
        # The one reshape is the view the chain made: it takes the root's value (no dispatch).
        return b.call_computing(m.root, aten.reshape.default, m["x"], m["shape"])
    return b.call(aten.reshape.default, m["x"], m["shape"])


def noop_rules() -> RuleSet:
    return RuleSet(
        "cleanup.noop",
        [
            # x viewed or sliced to its own shape is x.
            # (Asked of the node first: most views change the shape.)
            Rule(
                "noop.view",
                such_that(
                    op(VIEWS, x, anything()), _keeps_input_shape, "(shape provably its input's)"
                ),
                lambda b, m: m["x"],
            ),
            Rule(
                "noop.slice",
                op(aten.slice.Tensor, x, anything(), anything(), anything(), anything()),
                lambda b, m: m["x"],
                where=_keeps_shape,
            ),
            # Scattering a full-size src into x overwrites all of x.
            Rule(
                "noop.slice_scatter",
                op(
                    aten.slice_scatter.default, x, y, anything(), anything(), anything(), anything()
                ),
                lambda b, m: m["y"],
                where=_src_fills_self,
            ),
            # view(view(x)) is one view of x, or x itself when the shapes agree.
            Rule(
                "noop.view_chain", op(VIEWS, op(VIEWS, x, anything()), anything("shape")), _one_view
            ),
        ],
    )
