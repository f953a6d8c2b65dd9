"""fxsp: rewrite PyTorch FX graphs with a small pattern DSL; sequence parallelism for TP models.

The folders, bottom up: `dsl/` (the pattern language and rewrite engine), `policy/` (when a
rewrite pays: token thresholds, the fused all-reduce's gate), `ir/` (fxsp's ops, raising model
spellings to them, lowering them, kernels), `cleanup/`, `sp/` (the SP rule sets), `runtime/`
(what runs beside compiled graphs), `patches/` (torch version fixes), `compile/` (the
torch.compile backend, its passes, options, reports and cache), `adapters/` (vLLM).
"""

from .compile.backend import Backend, backend
from .compile.options import Options
from .dsl import (
    ADD,
    CAST,
    MUL,
    PASS_THROUGH,
    Builder,
    Match,
    Pattern,
    Report,
    Rule,
    RuleSet,
    alt,
    anything,
    dims,
    dtype,
    getitem,
    golden,
    literal,
    op,
    scalar,
    string,
    such_that,
    tensor,
    through,
)

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
