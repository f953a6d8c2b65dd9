"""Pipeline-stage boundaries: the receiving side of `fxsp.backend(..., shard_outputs=True)`,
and the row-block layout that SP shards by.

Layout: a value's rows (all dims but the last, flattened) are padded up to `tp` blocks of
ceil(rows / tp) rows, and rank r holds block r. `padded_block_rows` and `block_bounds` are its
one definition, for the runtime and for the SP rewrites (patterns/rows.py passes a `calc` that
emits graph nodes for symbolic sizes).

A stage compiled with `shard_outputs=True` returns the residual stream as this rank's block,
skipping the all-gather; each TP rank sends its block to its peer in the next stage, which is
1/tp of the bytes. The next stage calls `gather_rows` to rebuild the full value.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def _now(fn: Callable, *args: Any) -> Any:
    return fn(*args)


def padded_block_rows(rows: Any, tp: int, calc: Callable = _now) -> Any:
    """Rows each rank holds of a value of `rows` rows: ceil(rows / tp)."""
    return calc(operator.floordiv, calc(operator.add, rows, tp - 1), tp)


def block_bounds(per_rank: Any, rank: int, calc: Callable = _now) -> tuple[Any, Any]:
    """Rows [start, end) of rank `rank`'s block in the padded rows."""
    start = calc(operator.mul, per_rank, rank)
    return start, calc(operator.add, start, per_rank)


def gather_rows(shard: torch.Tensor, shape: tuple | torch.Size, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The full value of `shape` ([*, H]) from every TP rank's block of rows."""
    tp = dist.get_world_size(group)
    rows = torch.Size(shape[:-1]).numel()
    expected = (padded_block_rows(rows, tp), shape[-1])
    if tuple(shard.shape) != expected:
        raise ValueError(f"a shard of {tuple(shape)} over {tp} ranks has shape {expected}, got {tuple(shard.shape)}")
    blocks = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(blocks, shard.contiguous(), group=group)
    return torch.cat(blocks)[:rows].reshape(shape)
