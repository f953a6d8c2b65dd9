"""The row-block layout SP shards by: a value's rows (all dims but the last, flattened) are padded
up to `tp` blocks of ceil(rows / tp) rows, and rank r holds block r.

These two functions are its one definition, for the rewrites (`rows.py` passes a `calc` that
emits graph nodes for symbolic sizes) and for what runs (`fxsp.runtime.gather_rows`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any


def _now(fn: Callable, *args: Any) -> Any:
    return fn(*args)


def padded_block_rows(rows: Any, tp: int, calc: Callable = _now) -> Any:
    """Rows each rank holds of a value of `rows` rows: ceil(rows / tp)."""
    return calc(operator.floordiv, calc(operator.add, rows, tp - 1), tp)


def block_bounds(per_rank: Any, rank: int, calc: Callable = _now) -> tuple[Any, Any]:
    """Rows [start, end) of rank `rank`'s block in the padded rows."""
    start = calc(operator.mul, per_rank, rank)
    return start, calc(operator.add, start, per_rank)
