"""The row-block layout SP shards by: a value's rows (all dims but the last, flattened) are padded
up to `tp` blocks of ceil(rows / tp) rows, and rank r holds block r.

`padded_block_rows` and `block_bounds` are its one definition, for the rewrites (`rows.py` passes
a `calc` that emits graph nodes for symbolic sizes) and for what runs (`fxsp.runtime.gather_rows`).
`provably_equal` compares such sizes where they are symbolic.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch


def _now(fn: Callable, *args: Any) -> Any:
    return fn(*args)


def padded_block_rows(rows: Any, tp: int, calc: Callable = _now) -> Any:
    """Rows each rank holds of a value of `rows` rows: ceil(rows / tp)."""
    return calc(operator.floordiv, calc(operator.add, rows, tp - 1), tp)


def block_bounds(per_rank: Any, rank: int, calc: Callable = _now) -> tuple[Any, Any]:
    """Rows [start, end) of rank `rank`'s block in the padded rows."""
    start = calc(operator.mul, per_rank, rank)
    return start, calc(operator.add, start, per_rank)


def provably_equal(a: object, b: object, tp: int) -> bool:
    """Whether sizes `a` and `b` are equal for every value of the sizes they are computed from:
    known to sympy, or else, where they depend on one size only, checked for each of its
    residues modulo the TP size. Chunk layouts are floors and remainders by tp, which sympy
    does not relate (`(t + (-t % tp)) // tp` against `(t + tp - 1) // tp`); on t = tp * k + r
    both sides become expressions in k that it can compare, and the residues cover every t."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    import sympy  # here: `import fxsp` should not import it
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    from torch.utils._sympy.functions import FloorDiv, PythonMod
    from torch.utils._sympy.functions import Mod as TorchMod

    if statically_known_true(a == b):
        return True

    def plain(size: object) -> sympy.Expr:
        expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)
        expr = expr.replace(FloorDiv, lambda x, y: sympy.floor(x / y))
        return expr.replace(PythonMod, sympy.Mod).replace(TorchMod, sympy.Mod)

    difference = plain(a) - plain(b)
    if len(difference.free_symbols) != 1:
        return False
    (size,) = difference.free_symbols
    k = sympy.Dummy("k", integer=True, nonnegative=True)
    return all(sympy.simplify(difference.subs(size, tp * k + r)) == 0 for r in range(tp))
