"""The one place that computes fake values (`meta["val"]`) for new graph nodes."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Node
from torch.utils._pytree import tree_flatten, tree_map


def fake_value(target: Any, args: tuple, kwargs: dict) -> Any:
    """What `target(*args, **kwargs)` would return, as fake tensors, from the inputs' `meta["val"]`.

    Returns None when an input has no value to go on (the graph was built without metadata).
    """
    missing = False

    def val(a: Any) -> Any:
        nonlocal missing
        if isinstance(a, Node):
            if "val" not in a.meta:
                missing = True
            return a.meta.get("val")
        return a

    vals = tree_map(val, (args, kwargs), is_leaf=lambda a: isinstance(a, Node))
    if missing:
        return None
    if target is operator.getitem:  # an element of a tuple value: nothing to run
        return operator.getitem(*vals[0])
    tensors = [v for v in tree_flatten(vals)[0] if isinstance(v, torch.Tensor)]
    try:
        mode = detect_fake_mode(tensors)
    except AssertionError:
        # Inputs from several fake modes (make_fx in real mode makes one per value): rebuild
        # them in one fresh mode. Graphs with symbolic shapes always share a single mode.
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            vals = tree_map(_empty_like, vals)
    with mode or FakeTensorMode(allow_non_fake_inputs=True):
        return target(*vals[0], **vals[1])


def _empty_like(v: Any) -> Any:
    if not isinstance(v, torch.Tensor):
        return v
    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)


def tensor_of(node: Any) -> torch.Tensor | None:
    """The fake tensor a node computes (its `meta["val"]`); None for anything else."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True only when the shapes are provably equal: an unknown symbolic equality counts as no,
    and asking installs no guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))
