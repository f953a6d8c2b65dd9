"""Rank-consistency guard: ranks that rewrite one graph differently deadlock at its first
collective, so before a compiled graph first runs the ranks compare fingerprints of what they
compiled and fail with a clear error instead of hanging.

Two fingerprints per graph:
- *decisions*: what the rank will execute: the rules applied and the collectives of the
  rewritten graph (kind, dtype, shape, group), from fxsp's reports, cache hit or not. Ranks
  whose decisions differ fail.
- *facts*: what the decisions were taken from (the Dynamo graph's structure, input shapes, the
  options, TP size and group, fxsp's source). They may differ where decisions agree: uneven
  shards (a vocab of 128 at TP 3 gives embedding shards of 43, 43 and 42 rows) are normal. Facts
  only explain a mismatch, and are logged at DEBUG when they differ alone.
One all-gather of two int64 per compiled graph, on its first call only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("fxsp")


class RankMismatchError(RuntimeError):
    """Ranks compiled one graph differently; running it would deadlock."""


def fingerprint(*parts: Any) -> int:
    """A stable signed 64-bit hash of the parts' reprs (non-zero)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True) or 1


def decisions_fingerprint(reports: list) -> int:
    """The rewrite decisions of a graph's reports: rule counts and collective sequences, taken
    as JSON so a report read back from the cache fingerprints like the one that was saved."""
    return fingerprint(json.dumps([[r.counts, r.collectives] for r in reports], sort_keys=True))


def graph_structure(gm: torch.fx.GraphModule) -> list:
    """The graph's ops and wiring without literal values: user graphs legitimately hold
    rank-specific constants (a vocab-parallel embedding's offset), never a rank-specific shape
    of computation."""
    from ..dsl.pattern import target_name

    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [
        (
            n.op,
            target_name(n.target) if n.op == "call_function" else str(n.target),
            tuple(index[a] if isinstance(a, torch.fx.Node) else type(a).__name__ for a in n.args),
        )
        for n in gm.graph.nodes
    ]


class RankGuard:
    """Wraps a compiled callable; the first call checks all ranks agree, then steps aside."""

    def __init__(
        self, fn: Callable, group: dist.ProcessGroup, facts: int, decisions: int, what: str
    ) -> None:
        self.fn, self.group, self.facts, self.decisions, self.what = (
            fn,
            group,
            facts,
            decisions,
            what,
        )
        self.checked = False

    def __call__(self, *args: Any) -> Any:
        if not self.checked:
            check_ranks_agree(self.group, self.facts, self.decisions, self.what)
            self.checked = True
        return self.fn(*args)


def check_ranks_agree(
    group: dist.ProcessGroup, facts: int, decisions: int, what: str = "a graph"
) -> None:
    """Raise RankMismatchError on every rank unless all ranks of `group` took the same decisions."""
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == "nccl"
        else torch.device("cpu")
    )
    mine = torch.tensor([facts, decisions], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    table = [tuple(int(v) for v in t.tolist()) for t in everyone]
    base_facts, base_decisions = table[0]
    other_facts = [r for r, (f, _) in enumerate(table) if f != base_facts]
    differ = [r for r, (_, d) in enumerate(table) if d != base_decisions]
    if differ:
        also = (
            " (their inputs/options differ too: another shape, option or graph)"
            if set(differ) & set(other_facts)
            else " from the same inputs/options"
        )
        raise RankMismatchError(
            f"fxsp: ranks {differ} of the TP group compiled {what} with different rewrite "
            f"decisions than rank 0{also}; running it would deadlock at its first collective. "
            "Check that every rank passes the same options and traces the same graph "
            "(rank-dependent Python control flow?). Fingerprints (facts, decisions) by rank: "
            f"{table}"
        )
    if other_facts:
        log.debug(
            "fxsp: ranks %s compiled %s from other inputs than rank 0 (uneven shards?) and took "
            "the same rewrite decisions. Fingerprints (facts, decisions) by rank: %s",
            other_facts,
            what,
            table,
        )
