"""`golden(graph)`: a deterministic text form of an FX graph for expecttest.

Nodes are numbered in order and printed by qualified op name; kwargs are sorted, floats use
repr, process-group names become G0, G1, ... in order of appearance, devices and strides are
left out. The same graph prints the same text in any run or process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from .pattern import target_name

_SHORT = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.float8_e4m3fn: "f8e4m3fn", torch.float8_e4m3fnuz: "f8e4m3fnuz", torch.uint8: "u8",
    torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "b8",
}
_HIDDEN_KWARGS = {"device", "layout", "pin_memory"}


def golden(target: Graph | GraphModule, shapes: bool = True) -> str:
    """Text of `target`, one node a line; `shapes` adds dtype and shape from `meta["val"]`."""
    graph = target.graph if isinstance(target, GraphModule) else target
    ids: dict[Node, str] = {}
    groups: dict[str, str] = {}
    heads: dict = {}  # (op, target) -> (printed name, schema argument names): once per target
    lines = []
    for node in graph.nodes:
        if node.op == "output":
            lines.append(f"return {_arg(node.args[0], ids, groups, '')}")
            continue
        ids[node] = f"%{len(ids)}"
        if node.op == "placeholder":
            call = f"input({node.target!r})"
        elif node.op == "get_attr":
            call = f"attr({node.target!r})"
        else:
            call = _call(node, ids, groups, heads)
        line = f"{ids[node]} = {call}"
        if shapes and "val" in node.meta:
            line += f"  : {_value_type(node.meta['val'])}"
        lines.append(line)
    return "\n".join(lines)


def _call(node: Node, ids: dict, groups: dict, heads: dict) -> str:
    head = heads.get((node.op, node.target))
    if head is None:
        head = heads[node.op, node.target] = _head(node)
    name, names = head
    args = [_arg(a, ids, groups, names[i] if i < len(names) else "") for i, a in enumerate(node.args)]
    args += [f"{k}={_arg(v, ids, groups, k)}" for k, v in sorted(node.kwargs.items())
             if k not in _HIDDEN_KWARGS]
    return f"{name}({', '.join(args)})"


def _head(node: Node) -> tuple[str, list[str]]:
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    name = target_name(node.target) if node.op == "call_function" else f"{node.op}.{node.target}"
    return name, names


def _arg(value: Any, ids: dict, groups: dict, arg_name: str) -> str:
    if isinstance(value, Node):
        return ids.get(value, f"<{value.name}?>")
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_arg(v, ids, groups, "") for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_arg(v, ids, groups, '')}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, str) and "group" in arg_name:
        return groups.setdefault(value, f"G{len(groups)}")
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.device):
        return "<device>"
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)
    return repr(value)


def _value_type(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"{_SHORT.get(val.dtype, str(val.dtype))}[{dims}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_value_type(v) for v in val) + ")"
    if val is None:
        return "None"
    return type(val).__name__
