"""Rules and rule sets: a pattern plus the function that builds its replacement.

    double = Rule("x*2 -> x+x", op(aten.mul.Tensor, tensor("x"), 2),
                  lambda b, m: b.call(aten.add.Tensor, m["x"], m["x"]))
    report = RuleSet("demo", [double]).apply(graph_module)

A pass collects every match of every rule first (anchors found by op target, so the cost is
linear in graph size), then rewrites them in topological order of where they begin (their
earliest node), rule order breaking ties: of two rules that start at the same node, the one
listed first wins. Each match is checked again just before its rewrite, so a match spoiled by an
earlier rewrite is skipped rather than applied to a changed graph: matched again from its root,
or, when no node it read has changed, only its checks run again (the same match would be found).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.utils.fuser_utils import validate_partition

from .builder import Builder, erase_unused
from .match import Bindings, Miss, Trace, match
from .pattern import Alt, Behind, Op, Pattern, Through, target_name

log = logging.getLogger("fxsp")

# Meta keys a rewrite carries over: a new node takes the value of the matched node with the same
# target (when they agree), so a rewritten op keeps e.g. its spelling (fxsp/ir/ops.py adds it).
CARRIED_META: set = set()


@dataclass
class Match:
    """One place where a rule's pattern matched: its bindings, root and interior nodes."""

    rule: Rule
    root: Node
    bindings: dict
    nodes: tuple
    found: Bindings | None = None  # what the matcher yielded
    # (node, args, kwargs) of every node the match read, when it was the first structural match
    # at its root and the pattern reads nothing else: matching again on the same arguments
    # would find it first again.
    read: tuple = ()

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.bindings.get(name, default)


Rewrite = Callable[[Builder, Match], "Node | None"]


@dataclass
class Rule:
    """`pattern` ⇒ `rewrite(builder, match)`.

    The rewrite returns the node that replaces the root (or None when it replaced what it
    needed itself, with `builder.replace`). Interior nodes of the match may have users outside
    it only if their pattern names are listed in `outputs`. `where(match)` may veto a match:
    it returns True, or False / a string saying why not.
    """

    name: str
    pattern: Pattern
    rewrite: Rewrite
    outputs: tuple = ()
    where: Callable[[Match], bool | str] | None = None

    def anchors(self) -> frozenset:
        """The op targets a root node of this rule can have: the index the matcher uses."""
        return _root_targets(self.pattern)

    def match_at(self, node: Node, trace: Trace) -> Match | None:
        """The first complete match rooted at `node`, or None (failure reasons go to `trace`)."""
        first = True
        for b in match(self.pattern, node, Bindings(), trace):
            found = self._accepted(node, b, trace)
            if found is not None:
                if first and self._reads_only_its_nodes:
                    found.read = _arguments_read(b.nodes)
                return found
            first = False
        return None

    def match_again(self, m: Match, trace: Trace) -> Match | None:
        """`m` if it still holds, else the first match at its root now (None if none)."""
        unchanged = m.read and all(
            not n._erased and n.args is args and n.kwargs is kwargs for n, args, kwargs in m.read
        )
        if unchanged:
            again = self._accepted(m.root, m.found, trace)
            if again is not None:
                again.read = m.read
                return again
        return self.match_at(m.root, trace)

    def _accepted(self, node: Node, b: Bindings, trace: Trace) -> Match | None:
        """The match `b` at `node` if it is self-contained and `where` accepts it."""
        reason = self._check(node, b)
        if reason is not None:
            trace.fail(b.depth, "a self-contained match", reason, node)
            return None
        found = Match(self, node, b.values, b.nodes, b)
        verdict = self.where(found) if self.where is not None else True
        if verdict is True:
            return found
        trace.fail(
            b.depth,
            "the rule's condition",
            verdict if isinstance(verdict, str) else "`where` rejected the match",
            node,
        )
        return None

    @functools.cached_property
    def _reads_only_its_nodes(self) -> bool:
        """Whether matching reads only the matched nodes and their arguments (a `behind` chain's
        steps may read anything)."""
        return not _contains(self.pattern, Behind)

    def _check(self, root: Node, b: Bindings) -> str | None:
        """Interior nodes used outside the match block it, unless declared as outputs."""
        inside = set(b.nodes)
        allowed = None  # built at the first node with users outside (most matches have none)
        last = None
        escaping = False
        for n in b.nodes:
            outside = [u for u in n.users if u not in inside]
            if not outside:
                continue
            if allowed is None:
                allowed = {root, *b.shared} | {b.values[o] for o in self.outputs if o in b.values}
                last = max(inside)
            if n not in allowed:
                return f"{n.name} also used by {outside[0].name}"
            escaping = escaping or (n is not root and any(u < last for u in outside))
        # An output feeding back into the match would make the rewrite cyclic.
        if escaping and not validate_partition(list(inside)):
            return "rewrite would create a cycle"
        return None


class NearMiss:
    """Why `rule` did not match at the node named `anchor`: a `Miss`, or the `Trace` of the
    attempt, whose deepest failure is put in words only when read."""

    def __init__(self, rule: str, anchor: str, miss: Miss | Trace) -> None:
        self.rule, self.anchor, self._miss = rule, anchor, miss

    @property
    def miss(self) -> Miss:
        if isinstance(self._miss, Trace):
            self._miss = self._miss.best
        return self._miss

    @property
    def depth(self) -> int:
        return self._miss.depth  # a Miss's, or the Trace's deepest, without its texts

    def __str__(self) -> str:
        return f"{self.rule} at {self.anchor}: {self.miss.text()}"

    def __repr__(self) -> str:
        return f"NearMiss({self})"


@dataclass
class Report:
    """What one pass did: matches per rule, and for each rule the best near-miss."""

    name: str
    counts: dict = field(default_factory=dict)
    misses: dict = field(default_factory=dict)  # rule name -> NearMiss
    failures: list = field(default_factory=list)  # every anchor that did not match
    seconds: float = 0.0

    def explain(self) -> str:
        lines = [
            f"{self.name}: " + (", ".join(f"{k}={v}" for k, v in self.counts.items()) or "no rules")
        ]
        for rule, near in self.misses.items():
            lines.append(f"  near-miss {near}")
        return "\n".join(lines)

    def _missed(self, rule: Rule, anchor: Node | None, miss: Miss | Trace | None) -> None:
        if miss is None or (isinstance(miss, Trace) and miss.depth is None):
            miss = Miss(
                0,
                f"an anchor node ({', '.join(sorted(map(target_name, rule.anchors())))})",
                "none in graph",
                None,
            )
        near = NearMiss(rule.name, anchor.name if anchor is not None else "-", miss)
        self.failures.append(near)
        best = self.misses.get(rule.name)
        if best is None or near.depth > best.depth:
            self.misses[rule.name] = near


class RuleSet:
    """An ordered list of rules applied as one pass; `finish(graph)`, if given, runs after the
    last rewrite (work the rewrites left for the end)."""

    def __init__(
        self, name: str, rules: list[Rule], finish: Callable[[Graph], None] | None = None
    ) -> None:
        self.name = name
        self.rules = list(rules)
        self.finish = finish
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate rule names in {name}: {names}")

    def __iter__(self):
        return iter(self.rules)

    def apply(self, target: Graph | GraphModule, check: bool = False) -> Report:
        """Rewrite every match in `target`. `check=True` lints the graph after each rewrite."""
        graph = target.graph if isinstance(target, GraphModule) else target
        start = time.perf_counter()
        report = Report(self.name, {r.name: 0 for r in self.rules})
        for m in self._collect(graph, report):
            self._rewrite(graph, m, report, check)
        if self.finish is not None:
            self.finish(graph)
            if check:
                graph.lint()
        report.seconds = time.perf_counter() - start
        log.info(
            "%s: %s (%.1f ms)",
            self.name,
            ", ".join(f"{k}={v}" for k, v in report.counts.items()),
            report.seconds * 1e3,
        )
        for near in report.misses.values():
            log.debug("near-miss %s", near)
        if isinstance(target, GraphModule):
            target.recompile()
        return report

    def _collect(self, graph: Graph, report: Report) -> list[Match]:
        found, missed = [], []
        for rank, rule in enumerate(self.rules):
            # Nodes compare by their place in the graph.
            anchors = sorted(
                {
                    n
                    for t in rule.anchors()
                    for n in graph.find_nodes(op="call_function", target=t, sort=False)
                }
            )
            if not anchors:
                report._missed(rule, None, None)
            for node in anchors:
                trace = Trace()
                m = rule.match_at(node, trace)
                if m is not None:
                    found.append((min(m.nodes), rank, m))
                else:
                    missed.append((rule, node, trace))
        # An anchor inside another match is no near-miss worth reporting.
        covered = {n for _, _, m in found for n in m.nodes}
        for rule, node, miss in missed:
            if node not in covered:
                report._missed(rule, node, miss)
        found.sort(key=lambda t: t[:2])
        return [m for _, _, m in found]

    def _rewrite(self, graph: Graph, m: Match, report: Report, check: bool) -> None:
        if m.root._erased:  # spoiled too, and said so: the rule matched but did nothing
            erased = Miss(0, "an unchanged root", "a root erased by an earlier rewrite", None)
            report._missed(m.rule, m.root, erased)
            return
        trace = Trace()
        fresh = m.rule.match_again(m, trace)  # an earlier rewrite may have changed this spot
        if fresh is None:
            report._missed(m.rule, m.root, trace)
            return
        builder = Builder(graph)
        carried = _meta_by_target(fresh.nodes)
        replacement = m.rule.rewrite(builder, fresh)
        if replacement is not None and replacement is not fresh.root:
            builder.replace(fresh.root, replacement)
        for node in builder.created:
            for key, value in carried.get(node.target, {}).items():
                node.meta.setdefault(key, value)
        erase_unused(fresh.nodes)  # what the rewrite left unread, collectives included
        report.counts[m.rule.name] += 1
        if check:
            graph.lint()


def _meta_by_target(nodes: tuple) -> dict:
    """target -> {key: value} of the CARRIED_META keys on which the nodes of that target agree."""
    found: dict = {}
    for key in CARRIED_META:
        for n in nodes:
            if key in n.meta:
                found.setdefault(n.target, {}).setdefault(key, set()).add(n.meta[key])
    return {
        t: {k: next(iter(v)) for k, v in keys.items() if len(v) == 1} for t, keys in found.items()
    }


def _arguments_read(nodes: tuple) -> tuple:
    """(node, args, kwargs) of the nodes and of their inputs (leaf patterns may read those)."""
    read = dict.fromkeys(nodes)
    for n in nodes:
        read.update(dict.fromkeys(n.all_input_nodes))
    return tuple((n, n.args, n.kwargs) for n in read)


def _contains(p: Pattern, kind: type) -> bool:
    if isinstance(p, kind):
        return True
    children = {
        Op: lambda: (*p.args, *p.kwargs.values()),
        Alt: lambda: p.options,
        Through: lambda: (p.inner,),
        Behind: lambda: (p.inner,),
    }.get(type(p))
    return children is not None and any(_contains(c, kind) for c in children())


def _root_targets(p: Pattern) -> frozenset:
    if isinstance(p, Op):
        return p.targets
    if isinstance(p, Alt):
        return frozenset().union(*(_root_targets(o) for o in p.options))
    if isinstance(p, Through):
        return _root_targets(p.inner) | p.targets
    raise TypeError(f"a rule's root must be an op pattern, not {p!r}")
