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
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.float8_e4m3fn: "f8e4m3fn",
    torch.float8_e4m3fnuz: "f8e4m3fnuz",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "b8",
}
_HIDDEN_KWARGS = {"device", "layout", "pin_memory"}


def golden(target: Graph | GraphModule, shapes: bool = True) -> str:
    """Text of `target`, one node a line; `shapes` adds dtype and shape from `meta["val"]`."""
    return Snapshot(target).text(shapes)


class Snapshot:
    """What `golden` prints of a graph as it is now, taken in one cheap walk and printed later
    (`text()`), however the graph changes meanwhile: FX replaces a node's argument tuples and
    values rather than changing them in place, so holding them keeps them as they were."""

    def __init__(self, target: Graph | GraphModule) -> None:
        graph = target.graph if isinstance(target, GraphModule) else target
        # Column lists, not a tuple per node: thousands of new container objects would make the
        # garbage collector's young collections due sooner, in a process whose heap is large.
        self.nodes = list(graph.nodes)
        self.ops = [node.op for node in self.nodes]
        self.targets = [node.target for node in self.nodes]  # lowering may retarget a node
        self.args = [node.args for node in self.nodes]
        self.kwargs = [node.kwargs for node in self.nodes]
        self.values = [node.meta.get("val", _NO_VALUE) for node in self.nodes]

    def text(self, shapes: bool = True) -> str:
        ids: dict[Node, str] = {}
        groups: dict[str, str] = {}
        heads: dict = {}  # (op, target) -> (printed name, schema argument names): once per target
        types: dict = {}  # (dtype, sizes) -> printed value type: the same few recur in every layer
        lines = []
        for node, op, target, args, kwargs, val in zip(
            self.nodes, self.ops, self.targets, self.args, self.kwargs, self.values
        ):
            if op == "output":
                lines.append(f"return {_arg(args[0], ids, groups, '')}")
                continue
            name = ids[node] = f"%{len(ids)}"
            if op == "placeholder":
                call = f"input({target!r})"
            elif op == "get_attr":
                call = f"attr({target!r})"
            else:
                call = _call(op, target, args, kwargs, ids, groups, heads)
            if shapes and val is not _NO_VALUE:
                lines.append(f"{name} = {call}  : {_value_type_seen(val, types)}")
            else:
                lines.append(f"{name} = {call}")
        return "\n".join(lines)


_NO_VALUE = object()  # a node without meta["val"] (printed without a type; None prints "None")


def _call(
    op: str, target: Any, args: tuple, kwargs: dict, ids: dict, groups: dict, heads: dict
) -> str:
    head = heads.get((op, target))
    if head is None:
        head = heads[op, target] = _head(op, target)
    name, names = head
    printed = []
    for i, a in enumerate(args):
        if a.__class__ is Node:  # most arguments: printed without the general walk
            printed.append(ids.get(a) or f"<{a.name}?>")
        else:
            printed.append(_arg(a, ids, groups, names[i] if i < len(names) else ""))
    if kwargs:
        printed += [
            f"{k}={_arg(v, ids, groups, k)}"
            for k, v in sorted(kwargs.items())
            if k not in _HIDDEN_KWARGS
        ]
    return f"{name}({', '.join(printed)})"


def _head(op: str, target: Any) -> tuple[str, list[str]]:
    schema = getattr(target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    name = target_name(target) if op == "call_function" else f"{op}.{target}"
    return name, names


def _arg(value: Any, ids: dict, groups: dict, arg_name: str) -> str:
    if isinstance(value, Node):
        return ids.get(value, f"<{value.name}?>")
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_arg(v, ids, groups, "") for v in value)
        return (
            f"[{inner}]"
            if isinstance(value, list)
            else f"({inner}{',' if len(value) == 1 else ''})"
        )
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{k!r}: {_arg(v, ids, groups, '')}" for k, v in sorted(value.items()))
            + "}"
        )
    if isinstance(value, str) and "group" in arg_name:
        return groups.setdefault(value, f"G{len(groups)}")
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.device):
        return "<device>"
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)
    return repr(value)


def _value_type_seen(val: Any, types: dict) -> str:
    """`_value_type(val)`, looked up by dtype and sizes for a tensor of plain int sizes."""
    if isinstance(val, torch.Tensor):
        shape = val.shape
        if not all(d.__class__ is int for d in shape):  # symbolic: never a dict key (no guards)
            return _value_type(val)
        key = (val.dtype, shape)
        text = types.get(key)
        if text is None:
            text = types[key] = _value_type(val)
        return text
    return _value_type(val)


def _value_type(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"{_SHORT.get(val.dtype, str(val.dtype))}[{dims}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_value_type(v) for v in val) + ")"
    if val is None:
        return "None"
    return type(val).__name__
