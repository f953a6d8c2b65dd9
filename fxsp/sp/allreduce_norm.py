"""AllReduce + RMSNorm fusion for small batches: the all-reduce and the norm that reads it become
one fused op (FlashInfer's one-kernel all-reduce + norm on CUDA, the unfused chain elsewhere).

The rules, on fxsp's IR (see fxsp/ir/fused_ops.py for the fused ops):

    rms_norm        rms_norm(all_reduce(x))                  ⇒ allreduce_rms_norm(x)[0]
                    (the all-reduce's other readers take     ⇒ allreduce_rms_norm(x)[1])
    fused_add       fused_add_rms_norm(all_reduce(x), r)     ⇒ allreduce_fused_add_rms_norm(x, r)
                    (r + all_reduce(x) too: the sum commutes)
    *_fp8           the same followed by static_fp8_quant    ⇒ the op's static-FP8 form

Where it applies:
- only to sum all-reduces over the TP group (`cfg.group`), never another group's;
- only up to `cfg.max_tokens` rows (`"auto"`: `policy.thresholds.allreduce_rms_max_tokens`,
  which has no number off SM90 / SM100, so nothing is fused there unless a number is given).
  Symbolic row counts are fused only when provably within the limit (e.g.
  `torch._dynamo.mark_dynamic(x, 0, max=...)`).

It runs after the SP rules: SP takes the batches above its threshold, and what is left, the
small batches, is this rule set's. Whether it runs at all (TP > 1, one pipeline stage, CUDA
SM90 / SM100 family, FlashInfer importable) is decided by `policy.fusion`. Decisions depend
only on shapes, dtypes, group names and options, so every rank fuses the same sites.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from ..dsl.builder import Builder
from ..dsl.fake import known_true
from ..dsl.pattern import getitem
from ..dsl.rules import Match, Rule, RuleSet
from ..ir.fused_ops import (
    ALLREDUCE_FUSED_ADD_RMS_NORM,
    ALLREDUCE_FUSED_ADD_RMS_NORM_STATIC_FP8_QUANT,
    ALLREDUCE_RMS_NORM,
    ALLREDUCE_RMS_NORM_STATIC_FP8_QUANT,
)
from ..policy.thresholds import allreduce_rms_max_tokens
from . import site
from .rows import row_count


@dataclass(frozen=True)
class AllReduceNormConfig:
    """What the fusion rules need to know; the same on every rank."""

    group: str  # only all-reduces over this process group (the TP group) are fused
    world: int  # TP size
    max_tokens: int | str = "auto"  # fuse up to this many rows; "auto": policy.thresholds
    fp8: bool = True  # the static-FP8 forms


# --- patterns ----------------------------------------------------------------------------------

# The norm reads the all-reduce itself (site.py).
norm = site.rms_norm(site.reduced)
add_norm = site.fused_add_rms_norm(site.reduced)
norm_fp8 = site.static_fp8_quant(norm)
add_norm_fp8 = site.static_fp8_quant(getitem(add_norm, 0))


# --- rewrites ----------------------------------------------------------------------------------


def allreduce_norm_rules(cfg: AllReduceNormConfig) -> RuleSet:
    """The AllReduce+RMSNorm fusion rule set, to run after the SP rules."""

    def few_rows(m: Match, t: torch.Tensor) -> bool | str:
        """The fused kernel serves up to `cfg.max_tokens` rows: symbolic ones only if provably."""
        if t.dim() < 1:
            return "a 0-d all-reduce has no rows"
        limit = site.row_threshold(cfg.max_tokens, allreduce_rms_max_tokens, t, cfg.world)
        if isinstance(limit, str):
            return limit
        rows = row_count(t)
        if known_true(rows <= limit):
            return True
        if isinstance(rows, int):
            return f"{rows} rows > fusion limit {limit}"
        return f"symbolic rows may exceed the fusion limit {limit}"

    def applies(m: Match) -> bool | str:
        return site.applicable(m, cfg.group, few_rows)

    def fuse_norm(b: Builder, m: Match) -> Node:
        quant = site.quant_args(m)
        args = (m["x"], m["weight"], m["eps"], *quant, m["group"], m["flavor"])
        fused = b.call(ALLREDUCE_RMS_NORM_STATIC_FP8_QUANT if quant else ALLREDUCE_RMS_NORM, *args)
        # Every other reader of the all-reduce (the residual stream) reads the fused op's copy;
        # the norm reads it too until the engine erases it with the match.
        b.replace(m["reduced"], b.call(operator.getitem, fused, 1))
        return b.call(operator.getitem, fused, 0)

    def fuse_add_norm(b: Builder, m: Match) -> Node:
        quant = site.quant_args(m)
        args = (m["x"], m["residual"], m["weight"], m["eps"], *quant, m["group"], m["flavor"])
        if not quant:  # same outputs as the fused_add_rms_norm it replaces
            return b.call(ALLREDUCE_FUSED_ADD_RMS_NORM, *args)
        fused = b.call(ALLREDUCE_FUSED_ADD_RMS_NORM_STATIC_FP8_QUANT, *args)
        # the residual stream: readers of the norm's [1]
        b.replace_items(m["norm"], {1: b.call(operator.getitem, fused, 1)})
        return b.call(operator.getitem, fused, 0)

    rules = [
        Rule(
            "allreduce_norm.rms_norm_fp8", norm_fp8, fuse_norm, outputs=("reduced",), where=applies
        ),
        Rule(
            "allreduce_norm.fused_add_rms_norm_fp8",
            add_norm_fp8,
            fuse_add_norm,
            outputs=("norm",),
            where=applies,
        ),
        Rule("allreduce_norm.rms_norm", norm, fuse_norm, outputs=("reduced",), where=applies),
        Rule("allreduce_norm.fused_add_rms_norm", add_norm, fuse_add_norm, where=applies),
    ]
    return RuleSet("allreduce_norm", [r for r in rules if cfg.fp8 or not r.name.endswith("_fp8")])
