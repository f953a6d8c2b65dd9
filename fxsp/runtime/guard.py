"""Rank-consistency guard: ranks that rewrite one graph differently deadlock at its first
collective, so before a compiled graph first runs the ranks compare fingerprints of what they
compiled and fail with a clear error instead of hanging.

Two fingerprints per graph:
- *facts*: everything a decision may depend on (the Dynamo graph's structure, input shapes,
  the options, TP size and group, fxsp's source): known on every rank, cache hit or not.
- *decisions*: the rules applied and the collectives of the rewritten graph (kind, dtype,
  shape, group), known when this process ran the pass (0 on an Inductor cache hit, where that
  rank's decisions are those of the run that filled the cache).
One all-gather of two int64 per compiled graph, on its first call only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class RankMismatchError(RuntimeError):
    """Ranks compiled one graph differently; running it would deadlock."""


def fingerprint(*parts: Any) -> int:
    """A stable signed 64-bit hash of the parts' reprs (non-zero: 0 means 'unknown')."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True) or 1


def graph_structure(gm: torch.fx.GraphModule) -> list:
    """The graph's ops and wiring without literal values: user graphs legitimately hold
    rank-specific constants (a vocab-parallel embedding's offset), never a rank-specific shape
    of computation."""
    from ..pattern import target_name

    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [(n.op, target_name(n.target) if n.op == "call_function" else str(n.target),
             tuple(index[a] if isinstance(a, torch.fx.Node) else type(a).__name__ for a in n.args))
            for n in gm.graph.nodes]


class RankGuard:
    """Wraps a compiled callable; the first call checks all ranks agree, then steps aside."""

    def __init__(self, fn: Callable, group: dist.ProcessGroup, facts: int, decisions: int, what: str) -> None:
        self.fn, self.group, self.facts, self.decisions, self.what = fn, group, facts, decisions, what
        self.checked = False

    def __call__(self, *args: Any) -> Any:
        if not self.checked:
            check_ranks_agree(self.group, self.facts, self.decisions, self.what)
            self.checked = True
        return self.fn(*args)


def check_ranks_agree(group: dist.ProcessGroup, facts: int, decisions: int, what: str = "a graph") -> None:
    """Raise RankMismatchError on every rank unless all ranks of `group` agree."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor([facts, decisions], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    table = [tuple(int(v) for v in t.tolist()) for t in everyone]
    base_facts, base_decisions = table[0]
    differ = [r for r, (f, d) in enumerate(table)
              if f != base_facts or (d and base_decisions and d != base_decisions)]
    if differ:
        kinds = sorted({"inputs/options" if table[r][0] != base_facts else "rewrite decisions" for r in differ})
        raise RankMismatchError(
            f"fxsp: ranks {differ} of the TP group compiled {what} with different {' and '.join(kinds)} "
            f"than rank 0; running it would deadlock at its first collective. Check that every rank "
            f"passes the same options and traces the same graph (rank-dependent Python control "
            f"flow?). Fingerprints (facts, decisions) by rank: {table}")
