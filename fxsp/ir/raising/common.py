"""What every raising rule set shares: dtypes, cast patterns, the checked `rule`, small checks."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch.fx import Node

from ...dsl.builder import Builder
from ...dsl.fake import tensor_of
from ...dsl.pattern import (
    CAST,
    alt,
    op,
    scalar,
    tensor,
)
from ...dsl.rules import Match, Rule

aten, prims = torch.ops.aten, torch.ops.prims


F32 = torch.float32
LOW = (torch.bfloat16, torch.float16)  # computed through fp32 by every spelling we raise
FLOATS = (F32, *LOW)


def cast(value: Any, to: Any) -> Any:
    """`value.to(to)`: the post-grad spelling, or the `_to_copy` that make_fx records."""
    return alt(
        op(prims.convert_element_type.default, value, to),
        op(aten._to_copy.default, value, dtype=to),
    )


def maybe_cast(value: Any, to: Any) -> Any:
    return alt(cast(value, to), value)


def fp32_of(x_name: str = "x") -> Any:
    """x itself in fp32, or a bf16/fp16 x up-cast to fp32. Named "xf": every read of the
    up-cast value must be the same node. An fp32 x is never itself an up-cast: its input is the
    op's input (refused here, not after a whole match, since the second option then matches)."""
    fp32_x = tensor(x_name, [F32], where=lambda n: not is_upcast(n), doc="(not an up-cast)")
    return alt(fp32_x, cast(tensor(x_name, LOW), F32), name="xf")


def rule(name: str, pattern: Any, rewrite: Any, outputs: tuple = (), where: Any = None) -> Rule:
    """A raising rule. Its checks read shapes and dtypes from `meta["val"]`: a graph without
    them (not traced with fake tensors) is left alone, with the reason in the report."""

    def checked(m: Match) -> bool | str:
        for name_, value in m.bindings.items():
            for node in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(node, Node) and node.meta.get("val") is None:
                    return f"{name_} ({node.name}) has no meta['val']"
        return True if where is None else where(m)

    return Rule(name, pattern, rewrite, outputs, where=checked)


eps = scalar("eps", lo=0.0, where=math.isfinite, doc="eps > 0")


def per_feature_weight(x: Node, w: Any) -> bool | str:
    """A weight is one value per feature: shape [H], H the last dim of x."""
    if w is None:
        return True
    xv, wv = tensor_of(x), tensor_of(w)
    if wv is None or wv.dim() != 1 or not same_size(wv.shape[0], xv.shape[-1]):
        shape = list(wv.shape) if wv is not None else "?"
        return f"weight of shape {shape} is not one value per feature ({xv.shape[-1]})"
    return True


def cast_back_to_x(m: Match) -> bool | str:
    """A norm computed in fp32 is rounded once, to x's dtype: the result of a bf16 / fp16 x is
    cast back (`m["down"]`, the dtype of the cast at the pattern's root, if any)."""
    x, down_to = tensor_of(m["x"]), m.get("down")
    if down_to == F32 and x.dtype in LOW and any(map(is_fp32_identity_cast, m.nodes)):
        # Torch 2.11's joint-graph pass folds `normed.to(fp16).to(fp32)` into an fp32 -> fp32
        # cast, dropping the rounding the model does (2.12+ keeps narrowing round trips): the
        # raise rounds to x's dtype again, one rounding from the folded graph, none from eager.
        down_to = x.dtype
    if x.dtype in LOW and down_to is None:
        dt = short(x.dtype)
        return f"the fp32 result of a {dt} norm is never cast back to {dt}"
    if down_to is not None and down_to != x.dtype:
        return f"the result is cast to {short(down_to)}, not to the input's {short(x.dtype)}"
    return True


def outputs_only(m: Match, indices: set) -> bool | str:
    for user in m.root.users:
        if user.target is not operator.getitem or user.args[1] not in indices:
            return f"{user.name} reads more than the outputs {sorted(indices)}"
    return True


def all_of(*checks) -> bool | str:
    """The first failing check's reason, else True (checks are thunks: later ones may assume
    earlier ones passed)."""
    for check in checks:
        verdict = check()
        if verdict is not True:
            return verdict
    return True


def short(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def same_size(a: Any, b: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import (
        statically_known_true,
    )  # imports sympy: not at import

    return statically_known_true(a == b)


def is_upcast(node: Node) -> bool:
    """A cast of a bf16/fp16 value to fp32."""
    return (
        node.op == "call_function"
        and node.target in CAST
        and isinstance(node.args[0], Node)
        and tensor_of(node.args[0]) is not None
        and tensor_of(node.args[0]).dtype in LOW
        and tensor_of(node).dtype == F32
    )


def is_fp32_identity_cast(node: Node) -> bool:
    """A cast of an fp32 value to fp32: what is left of a folded fp32 -> low -> fp32 round trip."""
    return (
        node.op == "call_function"
        and node.target in CAST
        and isinstance(node.args[0], Node)
        and tensor_of(node.args[0]) is not None
        and tensor_of(node.args[0]).dtype == F32
        and tensor_of(node).dtype == F32
    )


def as_dtype(b: Builder, node: Node, dt: torch.dtype) -> Node:
    """`node`, cast to `dt` if the IR op's result dtype differs from the spelling's."""
    return (
        node
        if tensor_of(node).dtype == dt
        else b.call(prims.convert_element_type.default, node, dt)
    )


def as_dtype_of(b: Builder, node: Node, old: Node) -> Node:
    return as_dtype(b, node, tensor_of(old).dtype)
