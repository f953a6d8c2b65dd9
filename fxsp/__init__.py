"""fxsp: rewrite PyTorch FX graphs with a small pattern DSL; sequence parallelism for TP models."""

from .backend import Backend, Options, backend
from .builder import Builder
from .golden import golden
from .pattern import (
    ADD,
    CAST,
    MUL,
    PASS_THROUGH,
    Pattern,
    alt,
    anything,
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

__version__ = "0.1.0"

__all__ = [
    "ADD",
    "CAST",
    "MUL",
    "PASS_THROUGH",
    "Backend",
    "Builder",
    "Match",
    "Options",
    "Pattern",
    "Report",
    "Rule",
    "RuleSet",
    "alt",
    "anything",
    "backend",
    "dims",
    "dtype",
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
