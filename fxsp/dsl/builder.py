"""Builder: the only way rewrites add nodes, so every graph stays valid after every rewrite; and
`erase_unused`, the one way they remove them."""

from __future__ import annotations

import operator
import re
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch.fx import Graph, Node

from .fake import collect, fake_value

# Raw symbolic values in node arguments, which FX asks callers to avoid: only torch's
# create_node should see them, so that it warns (`create_call`).
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


class Builder:
    """Inserts each new node right after the latest of its inputs (never use-before-def) and
    fills its `meta["val"]` with a fake tensor, so later passes and Inductor see true shapes."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.created: set[Node] = set()

    def call(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        node = self._insert(target, args, kwargs)
        val = fake_value(target, args, kwargs)
        if val is not None:
            node.meta["val"] = val
        return node

    def call_computing(self, old: Node, target: Any, *args: Any, **kwargs: Any) -> Node:
        """`call`, for a node that computes exactly `old`'s value, `meta["val"]` and all: the
        same shape, strides and storage (a view of the same tensor, say), and that replaces `old`,
        which the rewrite erases. The new node takes `old`'s value instead of computing one; the
        caller must know the two agree (`fake.is_reshape_of`)."""
        node = self._insert(target, args, kwargs)
        if "val" in old.meta:
            node.meta["val"] = old.meta["val"]
        return node

    def _insert(self, target: Any, args: tuple, kwargs: dict) -> Node:
        leaves = collect((args, kwargs), (Node, *_SYMBOLIC), [])
        inputs: list[Node] = [a for a in leaves if isinstance(a, Node)]
        anchor = max(inputs) if inputs else None
        # Never before a placeholder: FX and Inductor expect every graph input first. An input
        # that is not a placeholder already comes after all of them.
        if anchor is None or anchor.op == "placeholder":
            anchor = max(filter(None, (anchor, self._last_placeholder())))
        # Nodes this builder already put after the anchor come first: keeps creation order.
        while anchor.next in self.created:
            anchor = anchor.next
        with self.graph.inserting_after(anchor):
            if len(inputs) == len(leaves):
                node = create_call(self.graph, target, args, kwargs)
            else:  # a raw SymInt argument: create_node warns about it, as it should
                node = self.graph.call_function(target, args, kwargs)
        self.created.add(node)
        return node

    def replace(self, old: Node, new: Node) -> None:
        """Point every user of `old` at `new`.

        `new` may come later in the graph than some users of `old` (a declared output rebuilt
        from an input defined after them): those users, and what depends on them, move after
        `new`, keeping their order, so no node is used before it is defined.
        """
        old.replace_all_uses_with(new, propagate_meta=False)
        cursor = new
        for user in _users_before(new):
            cursor.append(user)
            cursor = user

    def replace_items(self, tuple_node: Node, new: dict) -> None:
        """Point the users of `tuple_node[i]` at `new[i]`, for each index in `new`, and erase
        those getitems; users of other items stay as they are."""
        for user in list(tuple_node.users):
            if user.target is operator.getitem and user.args[1] in new:
                self.replace(user, new[user.args[1]])
                erase_unused([user])

    def _last_placeholder(self) -> Node:
        placeholders = self.graph.find_nodes(op="placeholder")
        return placeholders[-1] if placeholders else self.graph._root


def erase_unused(nodes: Iterable[Node], inputs: bool = False) -> None:
    """Erase each of `nodes` that nothing reads, in any order (erasing one may leave another
    unread); with `inputs`, also each node an erasure leaves unread, back through the graph. Only
    calls: graph inputs and attributes are left to dead-code removal (`fxsp.cleanup`). A dead
    collective is erased too, where `Graph.eliminate_dead_code` keeps its `wait_tensor` (marked
    side-effecting): all ranks erase the same ones."""
    nodes = list(nodes)
    among = None if inputs else set(nodes)
    stack = nodes[::-1]
    while stack:
        node = stack.pop()
        if node._erased or node.users or node.op != "call_function":
            continue
        read = node.all_input_nodes
        node.graph.erase_node(node)
        stack.extend(a for a in read if among is None or a in among)


def create_call(
    graph: Graph,
    target: Any,
    args: tuple,
    kwargs: dict,
    name: str | None = None,
    type_expr: Any = None,
) -> Node:
    """`graph.call_function(target, args, kwargs)` (at the graph's insert point) for arguments
    with no raw SymInt, SymFloat or SymBool in them, as the caller has checked
    (`has_raw_symbolic`).

    The node is created without arguments and then given them: the same node and bookkeeping,
    without `create_node`'s own walk of the arguments looking for raw symbolic values (torch
    2.13 walks them with pytree to warn; about a third of the cost of a node). A graph whose
    module has node-creation hooks (they may read the arguments) takes the plain path.
    """
    if name is None:
        name = _name_for(target)
    if getattr(graph.owning_module, "_create_node_hooks", None):
        return graph.create_node("call_function", target, args, kwargs, name, type_expr)
    node = graph.create_node("call_function", target, name=name, type_expr=type_expr)
    # The properties' own setters: `node.args = ...` would also go through Node.__setattr__,
    # which takes the node out of the graph's find_nodes table and puts it back (keyed by op and
    # target, which do not change here).
    _SET_ARGS(node, args)
    if kwargs:
        _SET_KWARGS(node, kwargs)
    return node


_SET_ARGS, _SET_KWARGS = Node.args.fset, Node.kwargs.fset


def _name_for(target: Any) -> str | None:
    """The name create_node starts from for `target` (`aten.mm.default` -> "mm_default"), as
    it names a first node of it in an empty graph. Passing it as the name gives the node the very
    name create_node would (the rest of naming depends only on it) without turning the target
    into a valid name again for every node (half the cost of create_node). None, and naming
    left to create_node, when that name ends in a number (a taken builtin name gets "_1"), and
    for targets other than ops and builtins (not kept alive in the cache)."""
    if not isinstance(target, (torch._ops.OpOverload, types.BuiltinFunctionType)):
        return None
    name = _NAMES.get(target, "")
    if name == "":
        name = Graph().create_node("call_function", target).name
        _NAMES[target] = name = None if re.search(r"_\d+$", name) else name
    return name


_NAMES: dict[Any, str | None] = {}


def has_raw_symbolic(args: Any) -> bool:
    """Whether node arguments hold a raw SymInt, SymFloat or SymBool (see `create_call`)."""
    return bool(collect(args, _SYMBOLIC, []))


def _users_before(node: Node) -> list[Node]:
    """Nodes before `node` that use it, directly or transitively, in graph order."""
    found: set[Node] = set()
    stack = [u for u in node.users if u < node]
    while stack:
        user = stack.pop()
        if user not in found:
            found.add(user)
            stack.extend(u for u in user.users if u < node)
    return sorted(found)
