"""What fxsp did to one compiled graph: `GraphReport` (what `backend.reports` holds), and its
round trip through plain JSON for the report cache (`cache.py`)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch.fx import Node

from ..dsl.golden import Snapshot
from ..dsl.match import Miss
from ..dsl.rules import NearMiss, Report
from .stats import AsyncTPSites, Traffic

log = logging.getLogger("fxsp")


class _GoldenText:
    """A report's golden text: set to a str, or to a `golden.Snapshot` of the graph, printed
    when first read (most reports are never read; a saved report is read by `to_json`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, report: Any, owner: type | None = None) -> str:
        if report is None:  # the dataclass default
            return ""
        value = report.__dict__.get(self.slot, "")
        if isinstance(value, Snapshot):
            value = report.__dict__[self.slot] = value.text()
        return value

    def __set__(self, report: Any, value: str | Snapshot) -> None:
        report.__dict__[self.slot] = value


@dataclass
class GraphReport:
    """What fxsp did to one compiled graph (kept stable: `backend.reports` holds these)."""

    counts: dict = field(default_factory=dict)  # rule name -> matches, over every pass
    misses: dict = field(default_factory=dict)  # rule name -> best near-miss
    before: str = _GoldenText()  # golden text of the post-grad graph as fxsp received it
    rewritten: str = _GoldenText()  # ... after the rewrite and clean-up, IR ops not yet lowered
    after: str = _GoldenText()  # ... and as fxsp handed it back
    passes: list = field(default_factory=list)  # the Report of each rule set
    traffic_before: Traffic | None = None  # collective bytes and norm rows, raised graph
    traffic_after: Traffic | None = None  # ... after the rewrite
    row_thresholds: list = field(default_factory=list)  # (symbolic rows, min rows) of SP sites
    collectives: list = field(default_factory=list)  # (op, value type, group index) in order
    cached: bool = False  # read back from fxsp's report cache: Inductor reused the compiled graph
    async_tp: AsyncTPSites | None = None  # micro-pipeline TP coverage, where it ran (async_tp)

    def explain(self) -> str:
        lines = [f"collective payload: {self.traffic_before} before, {self.traffic_after} after"]
        lines += [p.explain() for p in self.passes]
        if self.async_tp is not None:
            lines += [str(self.async_tp), *(f"  not fused: {why}" for why in self.async_tp.blocked)]
        return "\n".join(lines)

    def log_near_misses(self) -> None:
        for near in self.misses.values():
            log.info("near-miss %s", near)

    def to_json(self) -> dict:
        """The report as plain JSON data (no pickle: cache dirs are shared, and loading a
        pickle runs code). Symbolic row thresholds become text. `cached` is not part of it."""
        return {
            "counts": dict(self.counts),
            "misses": {rule: _near_miss_json(near) for rule, near in self.misses.items()},
            "before": self.before,
            "rewritten": self.rewritten,
            "after": self.after,
            "passes": [
                {
                    "name": r.name,
                    "counts": dict(r.counts),
                    "seconds": r.seconds,
                    "misses": {rule: _near_miss_json(near) for rule, near in r.misses.items()},
                    "failures": [_near_miss_json(near) for near in r.failures],
                }
                for r in self.passes
            ],
            "traffic_before": asdict(self.traffic_before) if self.traffic_before else None,
            "traffic_after": asdict(self.traffic_after) if self.traffic_after else None,
            "row_thresholds": [[str(rows), need] for rows, need in self.row_thresholds],
            "collectives": [list(c) for c in self.collectives],
            "async_tp": asdict(self.async_tp) if self.async_tp else None,
        }

    @classmethod
    def from_json(cls, data: dict, cached: bool = True) -> GraphReport:
        """The inverse of `to_json` (near-misses lose only their graph node)."""
        passes = [
            Report(
                r["name"],
                dict(r["counts"]),
                {rule: _near_miss(near) for rule, near in r["misses"].items()},
                [_near_miss(near) for near in r["failures"]],
                r["seconds"],
            )
            for r in data["passes"]
        ]
        return cls(
            counts=dict(data["counts"]),
            misses={rule: _near_miss(near) for rule, near in data["misses"].items()},
            before=data["before"],
            rewritten=data["rewritten"],
            after=data["after"],
            passes=passes,
            traffic_before=Traffic(**data["traffic_before"]) if data["traffic_before"] else None,
            traffic_after=Traffic(**data["traffic_after"]) if data["traffic_after"] else None,
            row_thresholds=[(rows, need) for rows, need in data["row_thresholds"]],
            collectives=[tuple(c) for c in data["collectives"]],
            async_tp=AsyncTPSites(**data["async_tp"]) if data.get("async_tp") else None,
            cached=cached,
        )

    def _add(self, report: Report) -> None:
        self.passes.append(report)
        for name, n in report.counts.items():
            self.counts[name] = self.counts.get(name, 0) + n
        self.misses.update(report.misses)


def _near_miss_json(near: NearMiss) -> dict:
    values = {f.name: getattr(near.miss, f.name) for f in fields(near.miss)}
    miss = {name: v for name, v in values.items() if v is not None and not isinstance(v, Node)}
    if near.miss.path is not None:  # linked (parent, key, value) hops, root first, by node name
        hops, path = [], near.miss.path
        while path is not None:
            path, key, value = path
            hops.append([key, getattr(value, "name", None)])
        miss["path"] = hops[::-1]
    return {"rule": near.rule, "anchor": near.anchor, "miss": miss}


@dataclass(frozen=True)
class _Named:
    """A graph node read back from JSON: only its name, which is what near-misses print."""

    name: str


def _near_miss(data: dict) -> NearMiss:
    known = {f.name for f in fields(Miss)}
    miss: dict[str, Any] = {name: None for name in known}  # a graph node, and None, are left out
    miss.update((k, v) for k, v in data["miss"].items() if k in known)
    path = None
    for key, name in miss["path"] or ():
        path = (path, key, _Named(name) if name is not None else None)
    miss["path"] = path
    return NearMiss(data["rule"], data["anchor"], Miss(**miss))
