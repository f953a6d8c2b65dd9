"""The one place that computes fake values (`meta["val"]`) for new graph nodes."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch._prims_common import make_contiguous_strides_for
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import Node
from torch.utils._pytree import tree_flatten, tree_map

from .collectives import C10D_ALL_GATHER, C10D_REDUCE_SCATTER, WAIT


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
    if target in _FRESH_RESULTS and _builds_directly(target, vals[0][0]):
        return _fresh_result(target, *vals[0], **vals[1])
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


# Ops that return a fresh dense tensor like their input but for dim 0, which SP inserts a few
# of per layer: their fake value is built directly, about 10x cheaper than a dispatch through
# the fake mode (tests/test_fake.py checks the two agree). Each maps (input, *args) to dim 0.
_FRESH_RESULTS = {
    WAIT: lambda x: x.shape[0],
    C10D_ALL_GATHER: lambda x, world, group: x.shape[0] * world,
    C10D_REDUCE_SCATTER: lambda x, reduce_op, world, group: x.shape[0] // world,
}


def _fresh_result(target: Any, x: FakeTensor, *args: Any) -> FakeTensor:
    shape = (_FRESH_RESULTS[target](x, *args), *x.shape[1:])
    meta = torch.empty_strided(shape, make_contiguous_strides_for(shape), dtype=x.dtype, device="meta")
    return x.fake_mode.fake_tensor_converter.from_meta_and_device(x.fake_mode, meta, x.device)


def _builds_directly(target: Any, x: Any) -> bool:
    """A fake input with rows, and for wait_tensor (an empty_like) a contiguous one."""
    return (isinstance(x, FakeTensor) and x.dim() > 0
            and (target is not WAIT or x.is_contiguous()))


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
