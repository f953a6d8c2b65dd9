"""The site both all-reduce rule sets rewrite: a norm reading an all-reduce's sum, with or
without a residual add, optionally followed by a static FP8 quant.

    reduced = all_reduce(x)
    norm(h)                     rms_norm(h, weight, eps), layer_norm(h, weight, bias, eps)
    fused_add_norm(h)           fused_add_rms_norm(h, residual, weight, eps), ... (or residual
                                first), for each kind of norm in `ops.NORM_KINDS`
    static_fp8_quant(normed)    static_fp8_quant(normed, scale, fp8_dtype)

The norm's kind is data: a rule matches any of them, and a rewrite calls the matched norm's own
op with its other arguments as they are. `h`, the norm's input, is `reduced` for the
AllReduce+RMSNorm fusion (allreduce_norm.py, RMSNorm only: `rms_norm`, `fused_add_rms_norm`)
and `reduced` behind row-wise ops for SP (rules.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple

import torch

from ..dsl.fake import same_shape, tensor_of
from ..dsl.pattern import Pattern, alt, anything, dtype, op, scalar, string, tensor
from ..dsl.rules import Match
from ..ir.ops import ALL_REDUCE, FP8_DTYPES, NORM_KINDS, STATIC_FP8_QUANT, NormKind

x, residual, eps = tensor("x"), tensor("residual"), scalar("eps")
RMS = next(kind for kind in NORM_KINDS if kind.name == "rms_norm")
reduced = op(ALL_REDUCE, x, string("group"), string("flavor"), name="reduced")


def norm(h: Pattern, kinds: tuple[NormKind, ...] = NORM_KINDS) -> Pattern:
    """A norm of one of `kinds` reading `h`; its parameters bound by name (weight, bias, eps)."""
    return _one_of([op(kind.norm, h, *_params(kind)) for kind in kinds])


def fused_add_norm(h: Pattern, kinds: tuple[NormKind, ...] = NORM_KINDS) -> Pattern:
    """A fused add + norm of one of `kinds`, `h` either operand of the sum (it commutes)."""
    return _one_of(
        [
            op(kind.fused_add, *operands, *_params(kind))
            for kind in kinds
            for operands in ((h, residual), (residual, h))
        ]
    )


def rms_norm(h: Pattern) -> Pattern:
    return norm(h, (RMS,))


def fused_add_rms_norm(h: Pattern) -> Pattern:
    return fused_add_norm(h, (RMS,))


def _one_of(norms: list[Pattern]) -> Pattern:
    return norms[0].named("norm") if len(norms) == 1 else alt(*norms, name="norm")


def _params(kind: NormKind) -> list[Pattern]:
    return [eps if name == "eps" else anything(name) for name in kind.params]


def static_fp8_quant(normed: Pattern) -> Pattern:
    return op(STATIC_FP8_QUANT, normed, tensor("scale"), dtype("fp8_dtype", FP8_DTYPES))


def quant_args(m: Match) -> tuple:
    """(scale, fp8_dtype) when the site ends in a static FP8 quant, else ()."""
    return (m["scale"], m["fp8_dtype"]) if "fp8_dtype" in m.bindings else ()


def applicable(
    m: Match, group: str, fits: Callable[[Match, torch.Tensor], bool | str]
) -> bool | str:
    """Whether a rule set may rewrite site `m`: its all-reduce is over the TP `group`, the rule
    set's own `fits(m, all-reduce input)` passes (rows against its threshold), and a residual has
    the norm input's shape. Rank-independent facts only: every rank must decide the same."""
    if m["group"] != group:
        return f"all-reduce over group {m['group']!r}, not the TP group"
    own = fits(m, tensor_of(m["x"]))
    if own is not True:
        return own
    h = m.get("h", m["reduced"])
    if "residual" in m.bindings and not same_shape(tensor_of(h), tensor_of(m["residual"])):
        return "residual shape differs from the all-reduce's"
    return True


def row_threshold(option: int | str, table: Callable, t: torch.Tensor, world: int) -> int | str:
    """A rule set's row threshold for activation `t`: `option`, or for "auto" what `table` (a
    policy.thresholds function) gives for t's hidden size, dtype and device, or why it has none."""
    if option != "auto":
        return int(option)
    tokens, reason = astuple(table(t.shape[-1], world, t.dtype, t.device))
    return reason if tokens is None else tokens
