"""Raising vLLM's ops: `_C.rms_norm` / `_C.fused_add_rms_norm` (under `auto_functionalized[_v2]`),
`vllm_ir.rms_norm` / `vllm_ir.fused_add_rms_norm`, its fused norm + static FP8 quant ops and
`_C.static_scaled_fp8_quant` → fxsp's norm and quant ops. Rules exist only for the ops loaded."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from ...dsl.builder import Builder
from ...dsl.fake import same_shape, tensor_of
from ...dsl.pattern import (
    alt,
    anything,
    op,
    tensor,
)
from ...dsl.rules import Match, Rule
from ..ops import (
    DIVIDE,
    FUSED_ADD_RMS_NORM,
    HF,
    RECIPROCAL,
    RMS_NORM,
    STATIC_FP8_QUANT,
    VLLM_IR,
    VLLM_IR_FUSED,
    spelled,
)
from .common import (
    F32,
    FLOATS,
    LOW,
    all_of,
    as_dtype,
    eps,
    outputs_only,
    per_feature_weight,
    rule,
    same_size,
)
from .norms import to_rms_norm

aten, prims = torch.ops.aten, torch.ops.prims
hop = torch.ops.higher_order


def _vllm_ir_rms_norm(b: Builder, m: Match) -> Node:
    return to_rms_norm(b, m, VLLM_IR)


# vLLM spellings. `_C` ops write into their arguments, so post-grad graphs carry them under
# `auto_functionalized` or `auto_functionalized_v2`, whose getitem 1, 2, ... are the new values
# of the written arguments, in order.


def functionalized(target: Any, written: dict[str, str], **args: Any) -> Any:
    """A call of `target` that writes the arguments `written` (argument name -> binding name):
    v1 passes every argument by name; v2 lists the written ones in `_all_bases`, by index (and
    adds `_<name>_size`-style kwargs for views, which this pattern refuses)."""
    by_name = {arg: tensor(binding) for arg, binding in written.items()}
    by_index = {f"_{arg}_base_index": i for i, arg in enumerate(written)}
    v2_bases = anything("bases")
    return alt(
        op(hop.auto_functionalized, target, **by_name, **args),
        op(hop.auto_functionalized_v2, target, _all_bases=v2_bases, **by_index, **args),
    )


def _mutated(m: Match, *names: str) -> list | None:
    """The written tensors, by binding name (under v2: `_all_bases`, in order), when they are
    distinct tensors."""
    bases = m.get("bases")
    found = [m.get(n) for n in names] if bases is None else list(bases)
    distinct = len(set(found)) == len(names) == len(found)
    return found if distinct and all(isinstance(n, Node) for n in found) else None


def vllm_rules(ops: dict) -> list[Rule]:
    """Rules for the vLLM ops that are loaded (a rule can only name an op that exists)."""
    x, w, residual, scale = tensor("x"), tensor("weight"), tensor("residual"), tensor("scale")
    rules = []
    if (target := ops.get("_C.rms_norm")) is not None:
        written = {"result": "out"}
        rules.append(
            rule(
                "raise.vllm_c_rms_norm",
                functionalized(target, written, input=x, weight=w, epsilon=eps),
                _c_rms_norm,
                where=_c_rms_norm_ok,
            )
        )
    if (target := ops.get("_C.fused_add_rms_norm")) is not None:
        written = {"input": "x", "residual": "residual"}
        rules.append(
            rule(
                "raise.vllm_c_fused_add_rms_norm",
                functionalized(target, written, weight=w, epsilon=eps),
                _c_fused_add_rms_norm,
                where=_c_fused_ok,
            )
        )
    if (target := ops.get("vllm_ir.rms_norm")) is not None:
        rules.append(
            rule(
                "raise.vllm_ir_rms_norm",
                op(target, tensor("x", FLOATS), anything("weight"), eps),
                _vllm_ir_rms_norm,
                where=_vllm_ir_ok,
            )
        )
    if (target := ops.get("vllm_ir.fused_add_rms_norm")) is not None:
        rules.append(
            rule(
                "raise.vllm_ir_fused_add_rms_norm",
                op(target, tensor("x", FLOATS), residual, anything("weight"), eps),
                _vllm_ir_fused,
                where=_vllm_ir_ok,
            )
        )
    # vLLM's RMSNorm + quant fusion (`fuse_norm_quant`) runs before fxsp's pass: its fused ops
    # are raised back to a norm and a quant, which the FP8 SP rules match.
    if (target := ops.get("_C.rms_norm_static_fp8_quant")) is not None:
        rules.append(
            rule(
                "raise.vllm_c_rms_norm_static_fp8_quant",
                functionalized(
                    target, {"result": "out"}, input=x, weight=w, scale=scale, epsilon=eps
                ),
                _c_norm_quant,
                where=_c_norm_quant_ok,
            )
        )
    if (target := ops.get("_C.fused_add_rms_norm_static_fp8_quant")) is not None:
        written = {"result": "out", "residual": "residual"}
        rules.append(
            rule(
                "raise.vllm_c_fused_add_rms_norm_static_fp8_quant",
                functionalized(target, written, input=x, weight=w, scale=scale, epsilon=eps),
                _c_norm_quant,
                where=_c_norm_quant_ok,
            )
        )
    if (target := ops.get("_C.static_scaled_fp8_quant")) is not None:
        rules.append(
            rule(
                "raise.vllm_c_static_fp8_quant",
                functionalized(target, {"result": "out"}, input=x, scale=scale),
                _c_quant,
                where=_c_quant_ok,
            )
        )
    return rules


def _c_rms_norm_ok(m: Match) -> bool | str:
    out = _mutated(m, "out")
    if out is None:
        return "not one whole result buffer"
    x, buf = tensor_of(m["x"]), tensor_of(out[0])
    if not same_shape(buf, x) or x.dtype not in FLOATS:
        return "result buffer and input differ in shape, or the input is not fp32/bf16/fp16"
    return all_of(lambda: per_feature_weight(m["x"], m["weight"]), lambda: outputs_only(m, {1}))


def _c_rms_norm(b: Builder, m: Match) -> None:
    # vLLM's kernel rounds the normalised value before the weight multiply: HF's numerics.
    out = spelled(b.call(RMS_NORM, m["x"], m["weight"], float(m["eps"])), HF)
    b.replace_items(m.root, {1: as_dtype(b, out, tensor_of(_mutated(m, "out")[0]).dtype)})


def _c_fused_ok(m: Match) -> bool | str:
    operands = _mutated(m, "x", "residual")
    if operands is None:
        return "input and residual are not two distinct whole tensors"
    x, r = map(tensor_of, operands)
    if not same_shape(x, r) or x.dtype != r.dtype or x.dtype not in FLOATS:
        return "input and residual differ in shape or dtype"
    return all_of(
        lambda: per_feature_weight(operands[0], m["weight"]), lambda: outputs_only(m, {1, 2})
    )


def _c_fused_add_rms_norm(b: Builder, m: Match) -> None:
    x, residual = _mutated(m, "x", "residual")
    # vLLM's kernel rounds the sum into `residual` and normalises what it stored: HF's numerics.
    fused = spelled(b.call(FUSED_ADD_RMS_NORM, x, residual, m["weight"], float(m["eps"])), HF)
    out = as_dtype(b, b.call(operator.getitem, fused, 0), tensor_of(x).dtype)
    b.replace_items(m.root, {1: out, 2: b.call(operator.getitem, fused, 1)})


def _c_norm_quant_ok(m: Match) -> bool | str:
    """vLLM's fused (add +) RMSNorm + static FP8 quant: distinct whole buffers, e4m3fn (its fnuz
    kernels clamp at 224), one scale, a per-feature weight."""
    fused = _adds_residual(m)
    written = _mutated(m, "out", "residual") if fused else _mutated(m, "out")
    if written is None:
        return "the written buffers are not distinct whole tensors"
    x, out = tensor_of(m["x"]), tensor_of(written[0])
    if out.dtype != torch.float8_e4m3fn:
        return f"result buffer of dtype {out.dtype}: vLLM's fnuz kernels clamp at 224"
    if x.dtype not in LOW + (F32,) or not same_shape(out, x):
        return "result buffer and input differ in shape, or the input is not fp32/bf16/fp16"
    if fused:
        r = tensor_of(written[1])
        if not same_shape(r, x) or r.dtype != x.dtype:
            return "input and residual differ in shape or dtype"
    if not same_size(tensor_of(m["scale"]).numel(), 1):
        return "the scale is not per-tensor"
    return all_of(
        lambda: per_feature_weight(m["x"], m["weight"]),
        lambda: outputs_only(m, {1, 2} if fused else {1}),
    )


def _adds_residual(m: Match) -> bool:
    return "fused_add" in m.rule.name


def _c_norm_quant(b: Builder, m: Match) -> None:
    """vLLM's kernels: HF's norm (the residual sum rounded and stored first), then x * (1/scale)."""
    weight, eps_value = m["weight"], float(m["eps"])
    if _adds_residual(m):
        residual = _mutated(m, "out", "residual")[1]
        fused = spelled(b.call(FUSED_ADD_RMS_NORM, m["x"], residual, weight, eps_value), HF)
        normed = b.call(operator.getitem, fused, 0)
        new = {2: b.call(operator.getitem, fused, 1)}
    else:
        normed, new = spelled(b.call(RMS_NORM, m["x"], weight, eps_value), HF), {}
    normed = as_dtype(b, normed, tensor_of(m["x"]).dtype)
    quant = spelled(b.call(STATIC_FP8_QUANT, normed, m["scale"], torch.float8_e4m3fn), RECIPROCAL)
    b.replace_items(m.root, {1: quant, **new})


def _vllm_ir_ok(m: Match) -> bool | str:
    if "residual" in m.bindings:
        x, r = tensor_of(m["x"]), tensor_of(m["residual"])
        if not same_shape(x, r) or x.dtype != r.dtype:
            return "input and residual differ in shape or dtype"
    if m["weight"] is not None and not isinstance(m["weight"], Node):
        return "weight is not a tensor"
    # vLLM versions round the normalised value to the weight's dtype or to x's: the same only
    # when they are the same.
    if m["weight"] is not None and tensor_of(m["weight"]).dtype != tensor_of(m["x"]).dtype:
        return "weight and x differ in dtype"
    outputs = (lambda: outputs_only(m, {0, 1})) if "residual" in m.bindings else (lambda: True)
    return all_of(lambda: per_feature_weight(m["x"], m["weight"]), outputs)


def _vllm_ir_fused(b: Builder, m: Match) -> None:
    fused = spelled(
        b.call(FUSED_ADD_RMS_NORM, m["x"], m["residual"], m["weight"], float(m["eps"])),
        VLLM_IR_FUSED,
    )
    old = m.root.meta["val"]
    b.replace_items(
        m.root,
        {
            0: as_dtype(b, b.call(operator.getitem, fused, 0), old[0].dtype),
            1: b.call(operator.getitem, fused, 1),
        },
    )


def _c_quant_ok(m: Match) -> bool | str:
    out = _mutated(m, "out")
    if out is None:
        return "not one whole result buffer"
    out = out[0]
    # vLLM's kernels clamp float8_e4m3fnuz at 224, not its max 240: only e4m3fn is equivalent.
    if tensor_of(out).dtype != torch.float8_e4m3fn:
        return f"result buffer of dtype {tensor_of(out).dtype}: vLLM's fnuz kernels clamp at 224"
    if not same_shape(tensor_of(out), tensor_of(m["x"])) or not same_size(
        tensor_of(m["scale"]).numel(), 1
    ):
        return "result buffer and input differ in shape, or the scale is not per-tensor"
    return outputs_only(m, {1})


def _c_quant(b: Builder, m: Match) -> None:
    out = spelled(b.call(STATIC_FP8_QUANT, m["x"], m["scale"], torch.float8_e4m3fn), DIVIDE)
    b.replace_items(m.root, {1: out})
