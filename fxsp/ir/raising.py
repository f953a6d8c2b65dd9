"""Raising: every common spelling of RMSNorm, fused add+RMSNorm, static FP8 quant and sum
all-reduce in a post-grad graph becomes one fxsp IR op, so the rewrite rules see one op per
concept whatever the model wrote.

    raise_ir(graph)   # -> [Report] of the passes below, in order

1. collectives  `wait_tensor(_c10d_functional.all_reduce(x, "sum", g))` (functional
                collectives, DTensor, Dynamo's rewrite of in-place `dist.all_reduce`) and
                `vllm.all_reduce(x, g)` → `fxsp.all_reduce(x, g, flavor)`. Other reductions
                ("avg", "max", ...) are never raised.
2. norms        the decomposed RMSNorm (HF/Llama, `F.rms_norm`, `nn.RMSNorm`, any eps, fp32 or
                bf16/fp16 through fp32), undecomposed `aten.rms_norm` / `aten._fused_rms_norm`,
                and vLLM's `_C.rms_norm` / `_C.fused_add_rms_norm` (under
                `auto_functionalized[_v2]`) and `vllm_ir.rms_norm` / `vllm_ir.fused_add_rms_norm`
                → `fxsp.rms_norm` / `fxsp.fused_add_rms_norm`.
3. add + norm   `rms_norm(x + residual)` → `fused_add_rms_norm(x, residual)`; the sum's other
                users read the op's second output.
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

import math
import operator
from functools import cache
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from ..builder import Builder
from ..fake import same_shape, tensor_of
from ..pattern import (
    ADD,
    CAST,
    CLONE,
    alt,
    anything,
    dims,
    dtype,
    getitem,
    op,
    scalar,
    string,
    such_that,
    tensor,
    through,
)
from ..rules import Match, Report, Rule, RuleSet
from ..collectives import C10D_ALL_REDUCE, WAIT, vllm_op
from .ops import (
    ALL_REDUCE,
    DIVIDE,
    FP8_DTYPES,
    FUSED_ADD_RMS_NORM,
    HF,
    RECIPROCAL,
    RMS_NORM,
    STATIC_FP8_QUANT,
    VLLM_IR,
    VLLM_IR_FUSED,
    WEIGHT_FIRST,
    fp8_max,
    spelled,
    spelling_of,
)

aten, prims = torch.ops.aten, torch.ops.prims
hop = torch.ops.higher_order

F32 = torch.float32
LOW = (torch.bfloat16, torch.float16)  # computed through fp32 by every spelling we raise
FLOATS = (F32, *LOW)


def raise_ir(target: Graph | GraphModule, check: bool = False) -> list[Report]:
    """Raise every recognised spelling in `target` to fxsp IR ops; one report per pass."""
    return [rule_set.apply(target, check=check) for rule_set in raising_passes()]


def raising_passes() -> list[RuleSet]:
    """The raising passes, in the order they must run. Rebuilt when vLLM ops (or stand-ins)
    appear, since rules can only name ops that exist."""
    return _passes(_vllm_ops())


# ---------------------------------------------------------------------------------------------
# Pattern helpers
# ---------------------------------------------------------------------------------------------


def cast(value: Any, to: Any) -> Any:
    """`value.to(to)`: the post-grad spelling, or the `_to_copy` that make_fx records."""
    return alt(op(prims.convert_element_type.default, value, to),
               op(aten._to_copy.default, value, dtype=to))


def maybe_cast(value: Any, to: Any) -> Any:
    return alt(cast(value, to), value)


def fp32_of(x_name: str = "x") -> Any:
    """x itself in fp32, or a bf16/fp16 x up-cast to fp32. Named "xf": every read of the
    up-cast value must be the same node. An fp32 x is never itself an up-cast: its input is the
    op's input (refused here, not after a whole match, since the second option then matches)."""
    fp32_x = tensor(x_name, [F32], where=lambda n: not _is_upcast(n), doc="(not an up-cast)")
    return alt(fp32_x, cast(tensor(x_name, LOW), F32), name="xf")


def _rule(name: str, pattern: Any, rewrite: Any, outputs: tuple = (), where: Any = None) -> Rule:
    """A raising rule. Its checks read shapes and dtypes from `meta["val"]`: a graph without
    them (not traced with fake tensors) is left alone, with the reason in the report."""

    def checked(m: Match) -> bool | str:
        for name_, value in m.bindings.items():
            for node in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(node, Node) and node.meta.get("val") is None:
                    return f"{name_} ({node.name}) has no meta['val']"
        return True if where is None else where(m)

    return Rule(name, pattern, rewrite, outputs, where=checked)


# ---------------------------------------------------------------------------------------------
# 1. Collectives
# ---------------------------------------------------------------------------------------------

c10d_sum = op(WAIT, op(C10D_ALL_REDUCE, tensor("x"), "sum", string("group")))
# Dynamo's functional form of an in-place `dist.all_reduce(x)`: x = copy(x, wait(all_reduce(x))).
c10d_sum_in_place = op(aten.copy.default, tensor("x"), c10d_sum)


def _copy_is_plain(m: Match) -> bool | str:
    """copy(x, y) is y when it neither broadcasts nor casts."""
    x, out = tensor_of(m["x"]), tensor_of(m.root)
    return (same_shape(x, out) and x.dtype == out.dtype) or "the copy broadcasts or casts"


def _all_reduce(flavor: str):
    def rewrite(b: Builder, m: Match) -> Node:
        return b.call(ALL_REDUCE, m["x"], m["group"], flavor)
    return rewrite


# ---------------------------------------------------------------------------------------------
# 2. Norms
# ---------------------------------------------------------------------------------------------

xf = fp32_of()
eps = scalar("eps", lo=0.0, where=math.isfinite, doc="eps > 0")


def _mean_of_square(v: Any) -> Any:
    return op(aten.mean.dim, alt(op(aten.pow.Tensor_Scalar, v, 2), op(aten.mul.Tensor, v, v)), dims([-1]), True)


mean_square = _mean_of_square(xf)
# A LayerNorm's pieces: x - mean(x) and the variance of the last dim, however spelled (HF's
# Cohere norm computes x - mean twice; torch's decomposition uses var_mean). Matched only so that
# `_exact_norm` refuses the norm by its mean-centring; a match with any of them binds `centred`.
_centred = tensor("centred")
_row_mean = op(aten.mean.dim, _centred, dims([-1]), True, name="row_mean")
_var_mean = op(aten.var_mean.correction, _centred, dims([-1]), correction=anything(), keepdim=True, name="var_mean")
centred_x = alt(op(aten.sub.Tensor, _centred, _row_mean), op(aten.sub.Tensor, _centred, getitem(_var_mean, 1)))
variance = alt(
    _mean_of_square(centred_x),
    getitem(_var_mean, 0),
    op(aten.var.correction, _centred, dims([-1]), correction=anything(), keepdim=True),
)
# x / sqrt(mean(x²) + eps), in fp32
normed = op(aten.mul.Tensor, alt(xf, centred_x), op(aten.rsqrt.default, op(ADD, alt(mean_square, variance), eps)))

weight = tensor("weight")
down = dtype("down", FLOATS)
# Left in fp32 (no cast back), the norm is exact only on an fp32 x: asked of the node first, so a
# bf16 F.rms_norm's inner `normed * w` is refused at once, not after a whole match.
normed_of_fp32 = such_that(normed, lambda n: not any(isinstance(a, Node) and _is_upcast(a) for a in n.args),
                           "(of an fp32 x: a bf16 or fp16 norm's fp32 result must be cast back)")
# torch's decomposition makes its fp32 result contiguous before the down-cast: a clone when x
# is not contiguous.
rms_norm_weighted = alt(
    op(aten.mul.Tensor, weight, alt(normed_of_fp32, cast(normed, down))),  # HF/Llama: w * normed.to(dtype)
    cast(through(op(aten.mul.Tensor, normed, weight), CLONE), down),  # F.rms_norm, Gemma
)
rms_norm_unweighted = maybe_cast(through(normed, CLONE), down)

# Undecomposed torch ops (export graphs, versions or backends that keep the fused op).
# Their numerics: (normed * w).type_as(x), the default eps is fp32's machine epsilon.
aten_rms_norm = alt(
    getitem(op(aten._fused_rms_norm.default, tensor("x", FLOATS), anything("shape"),
               anything("weight"), anything("eps")), 0),
    op(aten.rms_norm.default, tensor("x", FLOATS), anything("shape"), anything("weight"),
       anything("eps")),
)


def _exact_norm(m: Match) -> bool | str:
    """The matched norm computes what fxsp.rms_norm computes, up to the rounding the module
    docstring allows."""
    if m.get("centred") is not None or _is_centred(m["x"]):
        return "x is mean-centred (x - mean(x)): a LayerNorm, not an RMSNorm"
    x, down_to = tensor_of(m["x"]), m.get("down")
    if down_to == F32 and x.dtype in LOW and any(map(_is_fp32_identity_cast, m.nodes)):
        # Torch 2.11's joint-graph pass folds `normed.to(fp16).to(fp32)` into an fp32 -> fp32
        # cast, dropping the rounding the model does (2.12+ keeps narrowing round trips): the
        # raise rounds to x's dtype again, one rounding from the folded graph, none from eager.
        down_to = x.dtype
    if x.dtype in LOW and down_to is None:
        dt = _short(x.dtype)
        return f"the fp32 result of a {dt} norm is never cast back to {dt}"
    if down_to is not None and down_to != x.dtype:
        return f"the result is cast to {_short(down_to)}, not to the input's {_short(x.dtype)}"
    return _per_feature_weight(m["x"], m.get("weight"))


def _per_feature_weight(x: Node, w: Any) -> bool | str:
    """A weight is one value per feature: shape [H], H the last dim of x."""
    if w is None:
        return True
    xv, wv = tensor_of(x), tensor_of(w)
    if wv is None or wv.dim() != 1 or not _same_size(wv.shape[0], xv.shape[-1]):
        shape = list(wv.shape) if wv is not None else "?"
        return f"weight of shape {shape} is not one value per feature ({xv.shape[-1]})"
    return True


def _aten_norm_ok(m: Match) -> bool | str:
    x, shape = tensor_of(m["x"]), m["shape"]
    last_dim = isinstance(shape, (list, tuple)) and len(shape) == 1
    if not (last_dim and _same_size(shape[0], x.shape[-1])):
        return f"normalized_shape {list(shape)} is not the last dim"
    if m["eps"] is not None and not (isinstance(m["eps"], (int, float)) and m["eps"] > 0):
        return f"eps {m['eps']!r} is not a positive number"
    if m["weight"] is not None and not isinstance(m["weight"], Node):
        return "weight is not a tensor"
    return _per_feature_weight(m["x"], m["weight"])


def _rms_norm(b: Builder, m: Match, spelling: str | None = None) -> Node:
    """`spelling` None: HF's when the weight multiplies the rounded normalised value (the
    pattern's root is that multiply), else the weight first (`F.rms_norm`, `aten.rms_norm`)."""
    eps_value = m["eps"] if m["eps"] is not None else torch.finfo(F32).eps
    if spelling is None:
        weight_last = m.get("weight") is None or m.root.target is aten.mul.Tensor
        spelling = HF if weight_last else WEIGHT_FIRST
    out = spelled(b.call(RMS_NORM, m["x"], m.get("weight"), float(eps_value)), spelling)
    return _as_dtype_of(b, out, m.root)


def _vllm_ir_rms_norm(b: Builder, m: Match) -> Node:
    return _rms_norm(b, m, VLLM_IR)


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
    return alt(op(hop.auto_functionalized, target, **by_name, **args),
               op(hop.auto_functionalized_v2, target, _all_bases=v2_bases, **by_index, **args))


def _mutated(m: Match, *names: str) -> list | None:
    """The written tensors, by binding name (under v2: `_all_bases`, in order), when they are
    distinct tensors."""
    bases = m.get("bases")
    found = [m.get(n) for n in names] if bases is None else list(bases)
    distinct = len(set(found)) == len(names) == len(found)
    return found if distinct and all(isinstance(n, Node) for n in found) else None


def _vllm_rules(ops: dict) -> list[Rule]:
    """Rules for the vLLM ops that are loaded (a rule can only name an op that exists)."""
    x, w, residual, scale = tensor("x"), tensor("weight"), tensor("residual"), tensor("scale")
    rules = []
    if (target := ops.get("_C.rms_norm")) is not None:
        written = {"result": "out"}
        rules.append(_rule("raise.vllm_c_rms_norm",
                           functionalized(target, written, input=x, weight=w, epsilon=eps),
                           _c_rms_norm, where=_c_rms_norm_ok))
    if (target := ops.get("_C.fused_add_rms_norm")) is not None:
        written = {"input": "x", "residual": "residual"}
        rules.append(_rule("raise.vllm_c_fused_add_rms_norm",
                           functionalized(target, written, weight=w, epsilon=eps),
                           _c_fused_add_rms_norm, where=_c_fused_ok))
    if (target := ops.get("vllm_ir.rms_norm")) is not None:
        rules.append(_rule("raise.vllm_ir_rms_norm",
                           op(target, tensor("x", FLOATS), anything("weight"), eps),
                           _vllm_ir_rms_norm, where=_vllm_ir_ok))
    if (target := ops.get("vllm_ir.fused_add_rms_norm")) is not None:
        rules.append(_rule("raise.vllm_ir_fused_add_rms_norm",
                           op(target, tensor("x", FLOATS), residual, anything("weight"), eps),
                           _vllm_ir_fused, where=_vllm_ir_ok))
    # vLLM's RMSNorm + quant fusion (`fuse_norm_quant`) runs before fxsp's pass: its fused ops
    # are raised back to a norm and a quant, which the FP8 SP rules match.
    if (target := ops.get("_C.rms_norm_static_fp8_quant")) is not None:
        rules.append(_rule("raise.vllm_c_rms_norm_static_fp8_quant",
                           functionalized(target, {"result": "out"}, input=x, weight=w, scale=scale,
                                          epsilon=eps),
                           _c_norm_quant, where=_c_norm_quant_ok))
    if (target := ops.get("_C.fused_add_rms_norm_static_fp8_quant")) is not None:
        written = {"result": "out", "residual": "residual"}
        rules.append(_rule("raise.vllm_c_fused_add_rms_norm_static_fp8_quant",
                           functionalized(target, written, input=x, weight=w, scale=scale, epsilon=eps),
                           _c_norm_quant, where=_c_norm_quant_ok))
    if (target := ops.get("_C.static_scaled_fp8_quant")) is not None:
        rules.append(_rule("raise.vllm_c_static_fp8_quant",
                           functionalized(target, {"result": "out"}, input=x, scale=scale),
                           _c_quant, where=_c_quant_ok))
    return rules


def _outputs_only(m: Match, indices: set) -> bool | str:
    for user in m.root.users:
        if user.target is not operator.getitem or user.args[1] not in indices:
            return f"{user.name} reads more than the outputs {sorted(indices)}"
    return True


def _all(*checks) -> bool | str:
    """The first failing check's reason, else True (checks are thunks: later ones may assume
    earlier ones passed)."""
    for check in checks:
        verdict = check()
        if verdict is not True:
            return verdict
    return True


def _c_rms_norm_ok(m: Match) -> bool | str:
    out = _mutated(m, "out")
    if out is None:
        return "not one whole result buffer"
    x, buf = tensor_of(m["x"]), tensor_of(out[0])
    if not same_shape(buf, x) or x.dtype not in FLOATS:
        return "result buffer and input differ in shape, or the input is not fp32/bf16/fp16"
    return _all(lambda: _per_feature_weight(m["x"], m["weight"]), lambda: _outputs_only(m, {1}))


def _c_rms_norm(b: Builder, m: Match) -> None:
    # vLLM's kernel rounds the normalised value before the weight multiply: HF's numerics.
    out = spelled(b.call(RMS_NORM, m["x"], m["weight"], float(m["eps"])), HF)
    b.replace_items(m.root, {1: _as_dtype(b, out, tensor_of(_mutated(m, "out")[0]).dtype)})


def _c_fused_ok(m: Match) -> bool | str:
    operands = _mutated(m, "x", "residual")
    if operands is None:
        return "input and residual are not two distinct whole tensors"
    x, r = map(tensor_of, operands)
    if not same_shape(x, r) or x.dtype != r.dtype or x.dtype not in FLOATS:
        return "input and residual differ in shape or dtype"
    return _all(lambda: _per_feature_weight(operands[0], m["weight"]),
                lambda: _outputs_only(m, {1, 2}))


def _c_fused_add_rms_norm(b: Builder, m: Match) -> None:
    x, residual = _mutated(m, "x", "residual")
    # vLLM's kernel rounds the sum into `residual` and normalises what it stored: HF's numerics.
    fused = spelled(b.call(FUSED_ADD_RMS_NORM, x, residual, m["weight"], float(m["eps"])), HF)
    out = _as_dtype(b, b.call(operator.getitem, fused, 0), tensor_of(x).dtype)
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
    if not _same_size(tensor_of(m["scale"]).numel(), 1):
        return "the scale is not per-tensor"
    return _all(lambda: _per_feature_weight(m["x"], m["weight"]),
                lambda: _outputs_only(m, {1, 2} if fused else {1}))


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
    normed = _as_dtype(b, normed, tensor_of(m["x"]).dtype)
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
    outputs = (lambda: _outputs_only(m, {0, 1})) if "residual" in m.bindings else (lambda: True)
    return _all(lambda: _per_feature_weight(m["x"], m["weight"]), outputs)


def _vllm_ir_fused(b: Builder, m: Match) -> None:
    fused = spelled(b.call(FUSED_ADD_RMS_NORM, m["x"], m["residual"], m["weight"], float(m["eps"])),
                    VLLM_IR_FUSED)
    old = m.root.meta["val"]
    b.replace_items(m.root, {0: _as_dtype(b, b.call(operator.getitem, fused, 0), old[0].dtype),
                               1: b.call(operator.getitem, fused, 1)})


# ---------------------------------------------------------------------------------------------
# 3. Residual add + norm
# ---------------------------------------------------------------------------------------------

residual_sum = op(aten.add.Tensor, tensor("x"), tensor("residual"), name="residual_out")
add_then_norm = op(RMS_NORM, residual_sum, anything("weight"), scalar("eps"))


def _plain_sum(m: Match) -> bool | str:
    x, residual, out = (tensor_of(m[n]) for n in ("x", "residual", "residual_out"))
    if same_shape(x, out) and same_shape(residual, out):
        return True
    return f"the add broadcasts ({tuple(x.shape)} + {tuple(residual.shape)})"


def _fuse_add(b: Builder, m: Match) -> Node:
    # The sum is rounded to its dtype, then normalised as the norm was spelled.
    fused = spelled(b.call(FUSED_ADD_RMS_NORM, m["x"], m["residual"], m["weight"], m["eps"]),
                    spelling_of(m.root) or HF)
    out = b.call(operator.getitem, fused, 0)
    b.replace(m["residual_out"], b.call(operator.getitem, fused, 1))
    return out


# ---------------------------------------------------------------------------------------------
# 4. Static FP8 quant
# ---------------------------------------------------------------------------------------------

scale = tensor("scale")
reciprocal = op(aten.reciprocal.default, scale, name="reciprocal")
inverse_scale = alt(reciprocal, op(aten.mul.Tensor, reciprocal, 1.0), name="inverse_scale")
# A bf16/fp16 x divided by an fp32 scale promotes to fp32 by itself: the same as x.float() / scale.
x_in_fp32 = alt(fp32_of(), tensor("x", LOW))
quotient = alt(op(aten.div.Tensor, x_in_fp32, scale), op(aten.mul.Tensor, x_in_fp32, inverse_scale),
               name="quotient")
low, high = scalar("low"), scalar("high")
clamped = alt(op(aten.clamp_max.default, op(aten.clamp_min.default, quotient, low), high),
              op(aten.clamp_min.default, op(aten.clamp_max.default, quotient, high), low),
              op(aten.clamp.default, quotient, low, high))
fp8_quant = cast(clamped, dtype("fp8_dtype", FP8_DTYPES))


def _fp8_range(m: Match) -> bool | str:
    bound, (lo, hi) = fp8_max(m["fp8_dtype"]), (m["low"], m["high"])
    if (lo, hi) != (-bound, bound):
        return f"clamp to [{lo}, {hi}] is not {m['fp8_dtype']}'s range ±{bound}"
    if tensor_of(m["quotient"]).dtype != F32:
        return f"x / scale is computed in {_short(tensor_of(m['quotient']).dtype)}, not fp32"
    s = tensor_of(m["scale"])
    if not _same_size(s.numel(), 1) or s.dim() > tensor_of(m["x"]).dim():
        return f"scale of shape {list(s.shape)} is not one per-tensor value"
    return True


def _fp8_quant(b: Builder, m: Match) -> Node:
    spelling = RECIPROCAL if "reciprocal" in m.bindings else DIVIDE
    return spelled(b.call(STATIC_FP8_QUANT, m["x"], m["scale"], m["fp8_dtype"]), spelling)


def _c_quant_ok(m: Match) -> bool | str:
    out = _mutated(m, "out")
    if out is None:
        return "not one whole result buffer"
    out = out[0]
    # vLLM's kernels clamp float8_e4m3fnuz at 224, not its max 240: only e4m3fn is equivalent.
    if tensor_of(out).dtype != torch.float8_e4m3fn:
        return f"result buffer of dtype {tensor_of(out).dtype}: vLLM's fnuz kernels clamp at 224"
    if not same_shape(tensor_of(out), tensor_of(m["x"])) or not _same_size(tensor_of(m["scale"]).numel(), 1):
        return "result buffer and input differ in shape, or the scale is not per-tensor"
    return _outputs_only(m, {1})


def _c_quant(b: Builder, m: Match) -> None:
    out = spelled(b.call(STATIC_FP8_QUANT, m["x"], m["scale"], torch.float8_e4m3fn), DIVIDE)
    b.replace_items(m.root, {1: out})


# ---------------------------------------------------------------------------------------------
# The passes
# ---------------------------------------------------------------------------------------------


@cache
def _passes(vllm_ops: tuple) -> list[RuleSet]:
    ops = dict(vllm_ops)
    collectives = [
        _rule("raise.c10d_all_reduce_in_place", c10d_sum_in_place, _all_reduce("c10d"), where=_copy_is_plain),
        _rule("raise.c10d_all_reduce", c10d_sum, _all_reduce("c10d")),
    ]
    if (target := ops.get("vllm.all_reduce")) is not None:
        collectives.append(_rule("raise.vllm_all_reduce", op(target, tensor("x"), string("group")),
                                 _all_reduce("vllm")))
    vllm = _vllm_rules(ops)
    return [
        RuleSet("raise.collectives", collectives),
        RuleSet("raise.norms", [
            _rule("raise.rms_norm", rms_norm_weighted, _rms_norm, ("xf",), _exact_norm),
            _rule("raise.aten_rms_norm", aten_rms_norm, _rms_norm, where=_aten_norm_ok),
            *[r for r in vllm if "norm" in r.name],  # the fused norm + quant ops among them
        ]),
        # Every weighted norm contains an unweighted one: a pass of its own, after them.
        RuleSet("raise.norms_unweighted", [
            _rule("raise.rms_norm_unweighted", rms_norm_unweighted, _rms_norm, ("xf",),
                  _exact_norm),
        ]),
        RuleSet("raise.add_rms_norm", [
            _rule("raise.add_rms_norm", add_then_norm, _fuse_add, ("residual_out",), _plain_sum),
        ]),
        RuleSet("raise.fp8", [
            _rule("raise.static_fp8_quant", fp8_quant, _fp8_quant,
                  ("xf", "reciprocal", "inverse_scale"), _fp8_range),
            *[r for r in vllm if "quant" in r.name],
        ]),
    ]


_VLLM_OPS = ("_C.rms_norm", "_C.fused_add_rms_norm", "_C.static_scaled_fp8_quant",
             "_C.rms_norm_static_fp8_quant", "_C.fused_add_rms_norm_static_fp8_quant",
             "vllm_ir.rms_norm", "vllm_ir.fused_add_rms_norm")


def _vllm_ops() -> tuple:
    found = [(name, _lookup(*name.split("."))) for name in _VLLM_OPS]
    found.append(("vllm.all_reduce", vllm_op("all_reduce")))
    return tuple(found)


def _lookup(namespace: str, name: str) -> Any:
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _short(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _same_size(a: Any, b: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true  # imports sympy: not at import

    return statically_known_true(a == b)


def _is_upcast(node: Node) -> bool:
    """A cast of a bf16/fp16 value to fp32."""
    return (node.op == "call_function" and node.target in CAST and isinstance(node.args[0], Node)
            and tensor_of(node.args[0]) is not None and tensor_of(node.args[0]).dtype in LOW
            and tensor_of(node).dtype == F32)


def _is_fp32_identity_cast(node: Node) -> bool:
    """A cast of an fp32 value to fp32: what is left of a folded fp32 -> low -> fp32 round trip."""
    return (node.op == "call_function" and node.target in CAST and isinstance(node.args[0], Node)
            and tensor_of(node.args[0]) is not None and tensor_of(node.args[0]).dtype == F32
            and tensor_of(node).dtype == F32)


def _is_centred(node: Node) -> bool:
    """`a - mean(a, -1)`: the input of a LayerNorm's variance."""
    if node.target is not aten.sub.Tensor or len(node.args) != 2:
        return False
    a, mean = node.args
    return isinstance(mean, Node) and mean.target is aten.mean.dim and mean.args[0] is a


def _as_dtype(b: Builder, node: Node, dt: torch.dtype) -> Node:
    """`node`, cast to `dt` if the IR op's result dtype differs from the spelling's."""
    return node if tensor_of(node).dtype == dt else b.call(prims.convert_element_type.default, node, dt)


def _as_dtype_of(b: Builder, node: Node, old: Node) -> Node:
    return _as_dtype(b, node, tensor_of(old).dtype)


