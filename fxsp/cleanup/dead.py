"""Dead-code removal that also drops collectives nobody waits on.

`Graph.eliminate_dead_code` keeps every `wait_tensor` (registered as side-effecting), so a
collective whose result became unused by a rewrite would still run. A functional collective
whose every wait is dead is removable: all ranks run the same rewrite, so all drop it.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from ..ir.collectives import COMMUNICATING, kind


def remove_dead_code(graph: Graph) -> bool:
    """Erase dead nodes, dead collectives included. Returns whether anything changed.

    `Graph.eliminate_dead_code`'s walk, with the impurity test asked only of nodes without
    users (most nodes have some) and without its lint: erasing a node without users is safe in
    any order, and fxsp lints the graph when its passes end."""

    def impure(node: Node) -> bool:
        what = kind(node)
        if what in COMMUNICATING:
            return False
        if what == "wait":
            source = node.args[0]
            # A wait is removable once it is dead and waits on a collective (no other waits).
            return not (
                isinstance(source, Node)
                and kind(source) in COMMUNICATING
                and all(not u.users and kind(u) == "wait" for u in source.users)
            )
        return node.is_impure()

    changed = False
    # Reversed, so a node's inputs lose it as a user before they are visited.
    for node in reversed(graph.nodes):
        if not node.users and not impure(node):
            graph.erase_node(node)
            changed = True
    return _subgraphs_dead_code(graph) or changed


def _subgraphs_dead_code(graph: Graph) -> bool:
    """What `eliminate_dead_code` does for the subgraphs the graph reads (a HOP's body)."""
    module = graph.owning_module
    if module is None:
        return False
    read = {n.target for n in graph.find_nodes(op="get_attr")}
    changed = False
    for name, child in module.named_children():
        if name in read and isinstance(child, torch.fx.GraphModule):
            changed |= child.graph.eliminate_dead_code()
            child.recompile()
    return changed
