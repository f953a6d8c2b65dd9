"""Raising: every common spelling of RMSNorm, LayerNorm, a residual add before either, static
FP8 quant and sum all-reduce in a post-grad graph becomes one fxsp IR op, so the rewrite rules
see one op per concept whatever the model wrote.

    raise_ir(graph)   # -> [Report] of the passes below, in order

1. collectives  `wait_tensor(_c10d_functional.all_reduce(x, "sum", g))` (functional
                collectives, DTensor, Dynamo's rewrite of in-place `dist.all_reduce`) and
                `vllm.all_reduce(x, g)` → `fxsp.all_reduce(x, g, flavor)`. Other reductions
                ("avg", "max", ...) are never raised. Then sums of all-reduces fold into one
                all-reduce of the sum (`ir/fold.py`).
2. norms        the decomposed RMSNorm (HF/Llama, `F.rms_norm`, `nn.RMSNorm`, any eps, fp32 or
                bf16/fp16 through fp32), undecomposed `aten.rms_norm` / `aten._fused_rms_norm`,
                and vLLM's `_C.rms_norm` / `_C.fused_add_rms_norm` (under
                `auto_functionalized[_v2]`) and `vllm_ir.rms_norm` / `vllm_ir.fused_add_rms_norm`
                → `fxsp.rms_norm` / `fxsp.fused_add_rms_norm`; LayerNorm (`F.layer_norm`,
                `nn.LayerNorm`, with or without weight and bias, 1 + w, HF Cohere's two-pass form,
                `aten.native_layer_norm` / `aten.layer_norm`) → `fxsp.layer_norm` (layer_norm.py).
3. add + norm   `rms_norm(x + residual)` → `fused_add_rms_norm(x, residual)`, and the same for
                `layer_norm`; the sum's other users read the op's second output.
4. fp8          `(x / scale).clamp(-M, M).to(fp8)` (or `x * scale.reciprocal()`; x in fp32, or
                bf16/fp16 promoted by an fp32 scale), M the fp8 dtype's max, and vLLM's
                `_C.static_scaled_fp8_quant` → `fxsp.static_fp8_quant`. vLLM's fused
                `_C.rms_norm_static_fp8_quant` / `_C.fused_add_rms_norm_static_fp8_quant` (its
                `fuse_norm_quant` pass) are raised in pass 2, to a norm and a quant.

Numerics. A raise never changes what a graph computes: each raised node records the spelling
it came from (`ops.SPELLING`: the weight multiplied before or after the down-cast, x / scale or
x * (1 / scale), vLLM's `vllm_ir` ops, whose fused add normalises the unrounded sum), and
lowering emits that spelling again. Any spelling that no recorded one covers (a norm computed in
bf16, a result left in fp32, a clamp that is not the fp8 range) is left alone with the reason in
the report.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch.fx import Graph, GraphModule

from ...dsl.rules import Report, RuleSet
from ..collectives import vllm_op
from ..fold import fold_all_reduces
from .add_norm import add_norm_rules
from .collectives import collective_rules
from .fp8 import fp8_rules
from .layer_norm import layer_norm_rules, unweighted_layer_norm_rules
from .norms import norm_rules, unweighted_norm_rules
from .vllm import vllm_rules


def raise_ir(target: Graph | GraphModule, check: bool = False) -> list[Report]:
    """Raise every recognised spelling in `target` to fxsp IR ops, folding sums of all-reduces
    once the collectives are raised (`ir/fold.py`); one report per pass."""
    collectives, *rest = raising_passes()
    reports = [collectives.apply(target, check=check)]
    reports += fold_all_reduces(target.graph if isinstance(target, GraphModule) else target)
    return reports + [rule_set.apply(target, check=check) for rule_set in rest]


def raising_passes() -> list[RuleSet]:
    """The raising passes, in the order they must run. Rebuilt when vLLM ops (or stand-ins)
    appear, since rules can only name ops that exist."""
    return _passes(_vllm_ops())


@cache
def _passes(vllm_ops: tuple) -> list[RuleSet]:
    ops = dict(vllm_ops)
    vllm = vllm_rules(ops)
    return [
        RuleSet("raise.collectives", collective_rules(ops)),
        # vLLM's fused norm + quant ops are raised here, to a norm and a quant.
        # LayerNorms first: the RMSNorm rules refuse their mean-centring (in either order, but a
        # LayerNorm raised leaves the RMSNorm rules no near-miss to report).
        RuleSet(
            "raise.norms",
            [*layer_norm_rules(), *norm_rules(), *[r for r in vllm if "norm" in r.name]],
        ),
        RuleSet(
            "raise.norms_unweighted", [*unweighted_layer_norm_rules(), *unweighted_norm_rules()]
        ),
        RuleSet("raise.add_norm", add_norm_rules()),
        RuleSet("raise.fp8", [*fp8_rules(), *[r for r in vllm if "quant" in r.name]]),
    ]


_VLLM_OPS = (
    "_C.rms_norm",
    "_C.fused_add_rms_norm",
    "_C.static_scaled_fp8_quant",
    "_C.rms_norm_static_fp8_quant",
    "_C.fused_add_rms_norm_static_fp8_quant",
    "vllm_ir.rms_norm",
    "vllm_ir.fused_add_rms_norm",
)


def _vllm_ops() -> tuple:
    found = [(name, _lookup(*name.split("."))) for name in _VLLM_OPS]
    found.append(("vllm.all_reduce", vllm_op("all_reduce")))
    return tuple(found)


def _lookup(namespace: str, name: str) -> Any:
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None
