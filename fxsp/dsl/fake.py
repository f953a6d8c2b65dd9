"""The one place that computes fake values (`meta["val"]`) for new graph nodes."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import Node
from torch.fx.node import map_arg


def fake_value(target: Any, args: tuple, kwargs: dict) -> Any:
    """What `target(*args, **kwargs)` would return, as fake tensors, from the inputs' `meta["val"]`.

    Returns None when an input has no value to go on (the graph was built without metadata).
    """
    missing = []

    def val(a: Any) -> Any:
        if "val" not in a.meta:
            missing.append(a)
        return a.meta.get("val")

    vals = (map_arg(args, val), map_arg(kwargs, val))
    if missing:
        return None
    if target is operator.getitem:  # an element of a tuple value: nothing to run
        return operator.getitem(*vals[0])
    if target in FRESH_RESULTS and _builds_directly(target, vals[0][0]):
        return _fresh_result(target, *vals[0], **vals[1])
    tensors = collect(vals, torch.Tensor, [])
    results = _results_seen(target, tensors)
    key = _key(target, vals) if results is not None else None
    if key is not None:
        seen = results.get(key)
        if seen is not None and seen is not _ALIASES:
            return map_nested(seen, FakeTensor, fresh_like)
        if seen is None:
            value = _dispatch(target, vals, tensors)
            results[key] = value if _owns_storage(value, tensors) else _ALIASES
            return value
    return _dispatch(target, vals, tensors)


def _dispatch(target: Any, vals: tuple, tensors: list) -> Any:
    try:
        mode = detect_fake_mode(tensors)
    except AssertionError:
        # Inputs from several fake modes (make_fx in real mode makes one per value): rebuild
        # them in one fresh mode. Graphs with symbolic shapes always share a single mode.
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            vals = map_nested(vals, torch.Tensor, _empty_like)
    with mode or FakeTensorMode(allow_non_fake_inputs=True):
        return target(*vals[0], **vals[1])


# Ops that return a fresh dense tensor like their input but for dim 0, which rewrites insert a
# few of per layer (collectives: fxsp/ir/collectives.py registers them): their fake value is
# built directly, about 10x cheaper than a dispatch through the fake mode (tests/test_fake.py
# checks the two agree). Each maps (input, *args) to dim 0 of the result.
FRESH_RESULTS: dict[Any, Callable[..., Any]] = {}
# Of those, the ops that need a contiguous input for the shortcut (an empty_like).
_CONTIGUOUS_ONLY: set = set()


def fresh_result(target: Any, rows: Callable[..., Any], contiguous_input: bool = False) -> None:
    """Build `target`'s fake values directly: a fresh dense tensor like its first argument but
    with `rows(x, *other args)` rows; with `contiguous_input`, only for a contiguous input."""
    FRESH_RESULTS[target] = rows
    if contiguous_input:
        _CONTIGUOUS_ONLY.add(target)


def _fresh_result(target: Any, x: FakeTensor, *args: Any) -> FakeTensor:
    shape = (FRESH_RESULTS[target](x, *args), *x.shape[1:])
    # torch.empty gives a dense tensor the strides the ops' meta kernels give theirs, computed
    # in C++ (make_contiguous_strides_for in Python cost more than the rest of this function).
    meta = torch.empty(shape, dtype=x.dtype, device="meta")
    return FakeTensor(x.fake_mode, meta, x.fake_device)


# Results already computed, per fake mode: (target, inputs' metadata) -> a result whose
# metadata a new node with the same target and inputs' metadata shares. A node gets a fresh fake
# tensor built from it (about 5x cheaper than a dispatch), never the same object: two nodes must
# not look like views of one storage to Inductor's alias analysis. Results that alias an input
# (views) are dispatched every time, and so are ops that mutate or whose result has a size that
# depends on data (unbacked symbols).
# The cache lives on the mode (an attribute), so it goes when the mode does.
_ALIASES = object()  # the key's result is a view of an input: always dispatched


def _results_seen(target: Any, tensors: list) -> dict | None:
    """The result cache of the inputs' fake mode, or None when `target`'s results are not cached."""
    if (
        not (
            isinstance(target, torch._ops.OpOverload)
            and tensors
            and isinstance(tensors[0], FakeTensor)
        )
        or target._schema.is_mutable
    ):
        return None
    mode = tensors[0].fake_mode
    if any(not isinstance(t, FakeTensor) or t.fake_mode is not mode for t in tensors):
        return None
    results = getattr(mode, "_fxsp_results", None)
    if results is None:
        results = mode._fxsp_results = {}
    return results


def _key(target: Any, vals: Any) -> tuple | None:
    """What a result's metadata can depend on: the target, every tensor's metadata, every other
    argument's value and type (1, 1.0 and True differ). None when an argument has no such key."""
    try:
        return (target, _describe(vals))
    except TypeError:  # an unhashable argument: no key
        return None


def _describe(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        described = (a.shape, a.stride(), a.storage_offset(), a.dtype, a.device, a.requires_grad)
        try:
            hash(described)  # plain int sizes: the key as it is, hashed in C
        except TypeError:  # a symbolic size refuses to hash: key it by its expression
            described = (
                _sizes(a.shape),
                _sizes(a.stride()),
                _sizes((a.storage_offset(),)),
                *described[3:],
            )
        return described
    if isinstance(a, (tuple, list)):
        return (type(a), *map(_describe, a))
    if isinstance(a, dict):
        return (dict, *((k, _describe(v)) for k, v in a.items()))
    if isinstance(a, torch.SymInt | torch.SymFloat | torch.SymBool):
        return (type(a), a.node.expr)
    hash(a)
    return (type(a), a)


def _sizes(sizes: Any) -> tuple:
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in sizes)


def _owns_storage(value: Any, inputs: list) -> bool:
    """`value` is a tensor or a tuple of tensors, each with storage of its own (no view of an
    input or of another output), and no size that depends on data."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    outputs = list(value) if isinstance(value, (tuple, list)) else [value]
    if not outputs or not all(isinstance(o, FakeTensor) for o in outputs):
        return False
    storages = [t.untyped_storage()._cdata for t in inputs]
    for o in outputs:
        storage = o.untyped_storage()._cdata
        if storage in storages or free_unbacked_symbols(o) or o.storage_offset() != 0:
            return False
        storages.append(storage)
    return True


def fresh_like(val: Any) -> Any:
    """A new fake tensor with `val`'s shape, strides, dtype and device, and a storage of its own
    (anything but a fake tensor comes back as it is)."""
    if not isinstance(val, FakeTensor):
        return val
    meta = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
    return FakeTensor(val.fake_mode, meta, val.fake_device)  # fresh meta tensor: no memo to consult


def map_nested(value: Any, kind: type, fn: Any) -> Any:
    """`value` with `fn(x)` in place of each `x` of type `kind` inside tuples, lists and dicts
    (what node arguments nest in): a small, fast `tree_map` for node arguments."""
    if isinstance(value, kind):
        return fn(value)
    if isinstance(value, (tuple, list)):
        items = [map_nested(v, kind, fn) for v in value]
        return (
            type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        )  # namedtuple
    if isinstance(value, dict):
        return {k: map_nested(v, kind, fn) for k, v in value.items()}
    return value


def collect(value: Any, kind: type, out: list) -> list:
    """Append each `x` of type `kind` inside `value` (tuples, lists and dicts, as node arguments
    nest) to `out`, in order; returns `out`. `map_nested` without building a new structure."""
    if isinstance(value, kind):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            collect(v, kind, out)
    elif isinstance(value, dict):
        for v in value.values():
            collect(v, kind, out)
    return out


def _builds_directly(target: Any, x: Any) -> bool:
    """A fake input with rows, contiguous where the op asks for one."""
    return (
        isinstance(x, FakeTensor)
        and x.dim() > 0
        and (target not in _CONTIGUOUS_ONLY or x.is_contiguous())
    )


def _empty_like(v: Any) -> Any:
    if not isinstance(v, torch.Tensor):
        return v
    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)


def is_reshape_of(val: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `reshape(x, val.shape)` is exactly `val`: a view of x's storage at x's offset
    with val's strides. Known true when both are dense in row-major order (the strides a view of
    such a tensor always gets), compared as expressions, so asking installs no guard."""
    return (
        isinstance(val, FakeTensor)
        and isinstance(x, FakeTensor)
        and val.untyped_storage()._cdata == x.untyped_storage()._cdata
        and _sizes((val.storage_offset(),)) == _sizes((x.storage_offset(),))
        and (val.dtype, val.fake_device) == (x.dtype, x.fake_device)
        and _row_major(val)
        and _row_major(x)
    )


def _row_major(val: torch.Tensor) -> bool:
    """Strides exactly the row-major ones, size-1 dims too (each the product of the sizes after
    it), as expressions for symbolic sizes."""
    expected = 1
    for size, stride in zip(reversed(_sizes(val.shape)), reversed(_sizes(val.stride()))):
        if stride != expected:
            return False
        expected = expected * size
    return True


def tensor_of(node: Any) -> torch.Tensor | None:
    """The fake tensor a node computes (its `meta["val"]`); None for anything else."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True only when the shapes are provably equal: an unknown symbolic equality counts as no,
    and asking installs no guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return a.dim() == b.dim() and all(
        statically_known_true(x == y) for x, y in zip(a.shape, b.shape)
    )


def known_true(condition: Any) -> bool:
    """Whether a (possibly symbolic) condition is provably true, without guarding on it. The
    import is here: symbolic_shapes pulls in sympy, which `import fxsp` should not."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(condition)
