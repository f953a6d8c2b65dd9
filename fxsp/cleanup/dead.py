"""Dead-code removal that also drops collectives nobody waits on.

`Graph.eliminate_dead_code` keeps every `wait_tensor` (registered as side-effecting), so a
collective whose result became unused by a rewrite would still run. A functional collective
whose every wait is dead is removable: all ranks run the same rewrite, so all drop it.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from ..ir.collectives import vllm_op

c10d = torch.ops._c10d_functional
_C10D_COLLECTIVES = {
    c10d.all_reduce.default, c10d.reduce_scatter_tensor.default, c10d.all_gather_into_tensor.default,
}


def _collectives() -> set:
    found = set(_C10D_COLLECTIVES)
    for name in ("all_reduce", "reduce_scatter", "all_gather"):
        target = vllm_op(name)
        if target is not None:
            found.add(target)
    return found


def remove_dead_code(graph: Graph) -> bool:
    """Erase dead nodes, dead collectives included. Returns whether anything changed."""
    collectives = _collectives()

    def impure(node: Node) -> bool:
        if node.target in collectives:
            return False
        if node.target is c10d.wait_tensor.default:
            source = node.args[0]
            # A wait is removable once it is dead and waits on a collective (no other waits).
            return not (isinstance(source, Node) and source.target in collectives
                        and all(not u.users and u.target is c10d.wait_tensor.default for u in source.users))
        return node.is_impure()

    return graph.eliminate_dead_code(is_impure_node=impure)
