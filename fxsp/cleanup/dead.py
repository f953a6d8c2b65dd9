"""Dead-code removal that also drops collectives nobody waits on.

`Graph.eliminate_dead_code` keeps every `wait_tensor` (registered as side-effecting), so a
collective whose result became unused by a rewrite would still run. A functional collective
whose every wait is dead is removable: all ranks run the same rewrite, so all drop it.
"""

from __future__ import annotations

from torch.fx import Graph, Node

from ..collectives import COMMUNICATING, kind


def remove_dead_code(graph: Graph) -> bool:
    """Erase dead nodes, dead collectives included. Returns whether anything changed."""

    def impure(node: Node) -> bool:
        what = kind(node)
        if what in COMMUNICATING:
            return False
        if what == "wait":
            source = node.args[0]
            # A wait is removable once it is dead and waits on a collective (no other waits).
            return not (isinstance(source, Node) and kind(source) in COMMUNICATING
                        and all(not u.users and kind(u) == "wait" for u in source.users))
        return node.is_impure()

    return graph.eliminate_dead_code(is_impure_node=impure)
