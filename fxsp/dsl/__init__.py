"""fxsp's pattern DSL: a small, general library for rewriting torch.fx graphs. It knows nothing
of collectives or sequence parallelism; the rule sets in `fxsp.ir`, `fxsp.cleanup` and `fxsp.sp`
are written in it.

- `pattern.py`  the language: patterns are plain data built by calling `op`, `tensor`, ...
- `match.py`    the matcher, with the near-miss of every failed attempt
- `rules.py`    `Rule` (pattern ⇒ rewrite) and `RuleSet` (a pass), their `Report`
- `builder.py`  `Builder`, the only way rewrites add nodes, and `erase_unused`
- `fake.py`     fake values (`meta["val"]`) for new nodes
- `golden.py`   deterministic graph text for golden tests
"""

from .builder import Builder, erase_unused
from .golden import golden
from .pattern import (
    ADD,
    CAST,
    MUL,
    PASS_THROUGH,
    Pattern,
    alt,
    anything,
    behind,
    dims,
    dtype,
    getitem,
    literal,
    op,
    scalar,
    string,
    such_that,
    tensor,
    through,
)
from .rules import Match, Report, Rule, RuleSet

__all__ = [
    "ADD",
    "CAST",
    "MUL",
    "PASS_THROUGH",
    "Builder",
    "Match",
    "Pattern",
    "Report",
    "Rule",
    "RuleSet",
    "alt",
    "anything",
    "behind",
    "dims",
    "dtype",
    "erase_unused",
    "getitem",
    "golden",
    "literal",
    "op",
    "scalar",
    "string",
    "such_that",
    "tensor",
    "through",
]
