"""Builder: the only way rewrites add nodes, so every graph stays valid after every rewrite."""

from __future__ import annotations

import operator
from typing import Any

from torch.fx import Graph, Node

from .fake import collect, fake_value


class Builder:
    """Inserts each new node right after the latest of its inputs (never use-before-def) and
    fills its `meta["val"]` with a fake tensor, so later passes and Inductor see true shapes."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.created: set[Node] = set()

    def call(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        inputs: list[Node] = collect((args, kwargs), Node, [])
        anchor = max(inputs) if inputs else None
        # Never before a placeholder: FX and Inductor expect every graph input first. An input
        # that is not a placeholder already comes after all of them.
        if anchor is None or anchor.op == "placeholder":
            anchor = max(filter(None, (anchor, self._last_placeholder())))
        # Nodes this builder already put after the anchor come first: keeps creation order.
        while anchor.next in self.created:
            anchor = anchor.next
        with self.graph.inserting_after(anchor):
            node = self.graph.call_function(target, tuple(args), dict(kwargs))
        self.created.add(node)
        val = fake_value(target, tuple(args), dict(kwargs))
        if val is not None:
            node.meta["val"] = val
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
                user.graph.erase_node(user)

    def _last_placeholder(self) -> Node:
        placeholders = self.graph.find_nodes(op="placeholder")
        return placeholders[-1] if placeholders else self.graph._root


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
