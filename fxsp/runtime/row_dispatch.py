"""Run-time choice between a graph's SP and non-SP variants by the batch's row count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class RowDispatch:
    """Calls the SP variant when every rewritten site's row count reaches its threshold, the
    non-SP variant otherwise. Row counts are symbolic expressions over the graph's input sizes;
    every rank sees the same sizes, so every rank picks the same variant."""

    def __init__(
        self, with_sp: Callable, without_sp: Callable, thresholds: list, example_inputs: list
    ) -> None:
        self.with_sp, self.without_sp, self.thresholds = with_sp, without_sp, thresholds
        self.sources: dict = {}  # sympy symbol -> (input index, dim or None for an int input)
        for i, a in enumerate(example_inputs):
            sizes = (
                [(None, a)]
                if isinstance(a, torch.SymInt)
                else (list(enumerate(a.shape)) if isinstance(a, torch.Tensor) else [])
            )
            for dim, size in sizes:
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    self.sources.setdefault(size.node.expr, (i, dim))

    def use_sp(self, args: tuple) -> bool:
        import sympy  # here: `import fxsp` should not import it

        values = {
            sym: sympy.Integer(args[i] if dim is None else args[i].shape[dim])
            for sym, (i, dim) in self.sources.items()
        }
        for rows, need in self.thresholds:
            value = rows.xreplace(values)
            if not value.is_number or int(value) < need:  # unknown: the safe, non-SP variant
                return False
        return True

    def __call__(self, *args: Any) -> Any:
        return (self.with_sp if self.use_sp(args) else self.without_sp)(*args)
