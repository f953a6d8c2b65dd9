"""Clean-up after rewrites: no-op views and slices, dead collectives, dead code."""

from .dead import remove_dead_code
from .noop import noop_rules

__all__ = ["noop_rules", "remove_dead_code"]
