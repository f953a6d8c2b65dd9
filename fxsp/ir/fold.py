"""A sum of all-reduces over one group is one all-reduce of the sum.

    fold.pair      all_reduce(a) + all_reduce(b)          ⇒ all_reduce(a + b)
    fold.behind    (r + all_reduce(a)) + all_reduce(b)    ⇒ r + all_reduce(a + b)

Parallel-residual blocks (GPT-J, GPT-NeoX, Phi, Cohere, Falcon) all-reduce the attention and the
MLP outputs and add both to the residual; shared-expert MoE blocks all-reduce the routed and the
shared experts. Folded, they send half the bytes, with SP or without, and the one all-reduce left
is a site the SP rules can rewrite. Only where each all-reduce is read by the sum alone (else
it runs anyway) and the operands add without broadcasting or casting. The sum is taken before
the all-reduce rather than after: the same value up to the order of the additions.

It runs right after the collectives are raised, before a residual add is raised into a norm:
`norm(r + all_reduce(a) + all_reduce(b))` would otherwise hide the second add inside the norm.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..dsl.builder import Builder
from ..dsl.fake import same_shape, tensor_of
from ..dsl.pattern import op, string, tensor
from ..dsl.rules import Match, Report, Rule, RuleSet
from .ops import ALL_REDUCE

aten = torch.ops.aten

group, flavor = string("group"), string("flavor")
reduced_a = op(ALL_REDUCE, tensor("a"), group, flavor)
reduced_b = op(ALL_REDUCE, tensor("b"), group, flavor)
pair = op(aten.add.Tensor, reduced_a, reduced_b)
behind = op(aten.add.Tensor, op(aten.add.Tensor, tensor("r"), reduced_a, name="inner"), reduced_b)


def _adds_alike(m: Match) -> bool | str:
    """The summands and the sum share shape and dtype: the sum neither broadcasts nor casts."""
    out = tensor_of(m.root)
    for name in ("a", "b", "r", "inner"):
        value = m.get(name)
        t = tensor_of(value) if isinstance(value, Node) else None
        if value is not None and (t is None or not same_shape(t, out) or t.dtype != out.dtype):
            return f"{value.name} and the sum differ in shape or dtype"
    return True


def _fold_pair(b: Builder, m: Match) -> Node:
    return b.call(ALL_REDUCE, b.call(aten.add.Tensor, m["a"], m["b"]), m["group"], m["flavor"])


def _fold_behind(b: Builder, m: Match) -> Node:
    return b.call(aten.add.Tensor, m["r"], _fold_pair(b, m))


def fold_rules() -> RuleSet:
    return RuleSet(
        "fold",
        [
            Rule("fold.pair", pair, _fold_pair, where=_adds_alike),
            Rule("fold.behind", behind, _fold_behind, where=_adds_alike),
        ],
    )


def fold_all_reduces(graph: torch.fx.Graph, rounds: int = 8) -> list[Report]:
    """Apply the fold rules until nothing folds (a sum of n all-reduces takes n - 1 folds, one
    level of the sum per round); one report per round that ran."""
    reports = []
    for _ in range(rounds):
        report = fold_rules().apply(graph)
        reports.append(report)
        if not sum(report.counts.values()):
            break
    return reports
