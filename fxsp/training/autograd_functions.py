"""Hand-written TP collectives with autograd, lifted to DTensor so that SP can rewrite them.

Megatron-style models write TP's two conjugate collectives as autograd functions, which Dynamo
records as `autograd_function_apply(fwd_body, bwd_body, x)`:

    g (after a row-parallel matmul):  forward all-reduce,  backward identity
    f (before a column-parallel one): forward identity,    backward all-reduce

Each means what a DTensor redistribute means, and is replaced by it:

    g(x)  ⇒  to_local(redistribute(from_local(x, mesh, (Partial(),)), (Replicate(),)))
    f(x)  ⇒  to_local(from_local(x, mesh, (Replicate(),)), grad_placements=(Partial(),))

DTensor's autograd gives the same backward (a Replicate gradient stays as it is for g, and a
Partial one is all-reduced for f), and training.dtensor then rewrites them as it rewrites a
DTensor model's. A function whose bodies are anything else (another reduction, other ops, more
than one input) is left as it is.
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch.distributed.tensor import Partial, Replicate
from torch.fx import GraphModule, Node

c10d = torch.ops._c10d_functional
# Ops that pass a body's value through unchanged (in-place all-reduce is `clone`, then `copy_`
# of the reduced value into the clone).
PASS_THROUGH_METHODS = {"clone", "view_as", "contiguous", "view", "reshape"}
# Dynamo records the ops' packets; their `.default` overloads accepted too.
ALL_REDUCE = {c10d.all_reduce, c10d.all_reduce.default}
PASS_THROUGH_FUNCTIONS = {torch.clone, c10d.wait_tensor, c10d.wait_tensor.default}
GRAD_MODE = torch._C._set_grad_enabled


def lift_autograd_collectives(gm: GraphModule, from_local) -> int:
    """Replace each TP collective written as an autograd function in `gm` by its DTensor form;
    returns how many were. `from_local`: the function Dynamo records DTensor.from_local as."""
    graph, lifted, meshes = gm.graph, 0, {}
    for node in list(
        graph.find_nodes(op="call_function", target=torch.ops.higher_order.autograd_function_apply)
    ):
        kind = _kind(gm, node)
        out = _only_output(node)
        x = node.args[2]
        if kind is None or out is None or not isinstance(example_value(x), torch.Tensor):
            continue
        (role, group) = kind
        if group not in meshes:  # one node for each group's mesh: the rewrite compares them
            meshes[group] = _mesh_node(gm, group, example_value(x).device.type, len(meshes))
        mesh_node = meshes[group]
        with graph.inserting_before(node):
            if role == "g":
                partial = graph.call_function(
                    from_local, (x, mesh_node, (Partial(),)), {"run_check": False}
                )
                reduced = graph.call_method(
                    "redistribute", (partial,), {"placements": (Replicate(),)}
                )
                local = graph.call_method("to_local", (reduced,))
                _set_examples(gm, [partial, reduced, local])
            else:
                whole = graph.call_function(
                    from_local, (x, mesh_node, (Replicate(),)), {"run_check": False}
                )
                local = graph.call_method("to_local", (whole,), {"grad_placements": (Partial(),)})
                _set_examples(gm, [whole, local])
        out.replace_all_uses_with(local)
        graph.erase_node(out)
        graph.erase_node(node)
        lifted += 1
    return lifted


def _kind(gm: GraphModule, node: Node) -> tuple[str, str] | None:
    """("g" or "f", the group's name) for a TP collective's autograd function, else None."""
    if len(node.args) != 3 or node.kwargs.get("non_differentiable_idx"):
        return None
    forward, backward = (_body_effect(getattr(gm, a.target)) for a in node.args[:2])
    if forward == "identity" and backward not in (None, "identity"):
        return "f", backward
    if backward == "identity" and forward not in (None, "identity"):
        return "g", forward
    return None


def _body_effect(body: GraphModule) -> str | None:
    """What a one-input body computes: "identity", the name of the group it sums its input
    over (one all-reduce), or None for anything else."""
    inputs = body.graph.find_nodes(op="placeholder")
    if len(inputs) != 1:
        return None
    (output,) = body.graph.find_nodes(op="output")
    result = output.args[0]
    while isinstance(result, (tuple, list)) and result:  # fwd: ((outs,), saved); bwd: (grads,)
        if len(result) > 1 and not (isinstance(result[1], (tuple, list)) and not result[1]):
            return None
        result = result[0]
    groups = []
    for node in body.graph.nodes:
        if node.op in ("placeholder", "output") or node.target is GRAD_MODE:
            continue
        if node.target in ALL_REDUCE:
            if node.args[1] != "sum":
                return None
            groups.append(node.args[2])
        elif not (
            node.target in PASS_THROUGH_FUNCTIONS
            or (node.op == "call_method" and node.target in PASS_THROUGH_METHODS | {"copy_"})
        ):
            return None
    value, reductions, overwritten = result, 0, set()
    while isinstance(value, Node) and value is not inputs[0]:
        copies = [u for u in value.users if u.op == "call_method" and u.target == "copy_"]
        if copies and value not in overwritten:  # what was copied into `value` last
            overwritten.add(value)
            value = copies[-1].args[1]
        elif value.target in ALL_REDUCE:
            reductions += 1
            value = value.args[0]
        elif value.target in PASS_THROUGH_FUNCTIONS or value.target in PASS_THROUGH_METHODS:
            value = value.args[0]
        else:
            return None
    if value is not inputs[0] or reductions != len(groups) or reductions > 1:
        return None
    return groups[0] if groups else "identity"


def _only_output(node: Node) -> Node | None:
    """The `getitem(apply, 0)` that is the function's one result."""
    users = list(node.users)
    if len(users) == 1 and users[0].target is operator.getitem and users[0].args[1] == 0:
        return users[0]
    return None


def _mesh_node(gm: GraphModule, group: str, device_type: str, index: int) -> Node:
    """A node reading a 1-D DeviceMesh over the named group, an attribute of `gm`, placed
    after the graph's inputs."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.distributed_c10d import _resolve_process_group

    name = f"_fxsp_tp_mesh_{index}"
    setattr(gm, name, DeviceMesh.from_group(_resolve_process_group(group), device_type))
    *_, last_input = gm.graph.find_nodes(op="placeholder")
    with gm.graph.inserting_after(last_input), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not a Module, Parameter or buffer": a mesh is none
        return gm.graph.get_attr(name)


def example_value(node: object) -> object:
    """The value Dynamo recorded for a node of its graph (a fake tensor or DTensor), else None."""
    return node.meta.get("example_value") if isinstance(node, Node) else None


def _set_examples(gm: GraphModule, nodes: list[Node]) -> None:
    """Each new node's `example_value`, computed from its inputs' under their fake mode."""
    fake_mode = next(
        e.fake_mode
        for n in nodes
        for a in n.all_input_nodes
        if hasattr(e := example_value(a), "fake_mode")
    )
    for node in nodes:

        def value(a):
            if not isinstance(a, Node):
                return a
            return getattr(gm, a.target) if a.op == "get_attr" else example_value(a)

        args = torch.fx.node.map_arg(node.args, value)
        kwargs = torch.fx.node.map_arg(node.kwargs, value)
        with fake_mode:
            if node.op == "call_method":
                node.meta["example_value"] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                node.meta["example_value"] = node.target(*args, **kwargs)
