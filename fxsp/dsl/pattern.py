"""Patterns: plain data that describe a piece of an FX graph (the language; `match.py` finds them).

A pattern is a tree built by calling the builders below; building one traces nothing and runs
no op. ::

    x, eps = tensor("x"), scalar("eps", lo=0.0, hi=1e-2)
    var = op(aten.mean.dim, op(aten.pow.Tensor_Scalar, x, 2), dims([-1]), True)
    norm = op(aten.mul.Tensor, x, op(aten.rsqrt.default, op(ADD, var, eps)))
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.fx import Node

from .fake import tensor_of

aten = torch.ops.aten
prims = torch.ops.prims

# ---------------------------------------------------------------------------------------------
# Pattern nodes
# ---------------------------------------------------------------------------------------------


class Pattern:
    """Base class. `name` binds whatever this pattern matched; reusing a name demands equality."""

    name: str | None = None

    def named(self, name: str) -> Pattern:
        return replace(self, name=name)

    def __or__(self, other: Pattern) -> Pattern:
        return alt(self, other)


@dataclass(frozen=True, eq=False)
class Op(Pattern):
    targets: frozenset
    args: tuple
    kwargs: dict
    commutative: bool = False
    name: str | None = None
    where: Callable[[Node], bool] | None = None  # asked of the node before its arguments
    doc: str = ""  # what `where` asks, in words
    # The targets by id: ops are singletons, and an op's own __hash__ is Python code, which
    # the matcher would run at every node it tries.
    target_ids: frozenset = field(init=False, repr=False)
    layouts: dict = field(init=False, repr=False)  # id(target) -> its `_layout` for this pattern

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_ids", frozenset(map(id, self.targets)))
        object.__setattr__(self, "layouts", {})

    def __repr__(self) -> str:
        return _targets_text(self.targets)


@dataclass(frozen=True, eq=False)
class Tensor(Pattern):
    """Any FX node (a tensor value), optionally with its dtype in `dtypes` and accepted by
    `where` (`doc` says what it asks, in words)."""

    name: str | None = None
    dtypes: frozenset | None = None
    where: Callable[[Node], bool] | None = None
    doc: str = ""

    def __repr__(self) -> str:
        return f"tensor {self.name}" if self.name else "tensor"


@dataclass(frozen=True, eq=False)
class Scalar(Pattern):
    """A Python number (not a node) in (lo, hi], or accepted by `where`."""

    name: str | None = None
    lo: float = -math.inf
    hi: float = math.inf
    where: Callable[[Any], bool] | None = None
    doc: str = ""

    def __repr__(self) -> str:
        return f"scalar {self.name or ''} {self.doc or _range_text(self.lo, self.hi)}".strip()


@dataclass(frozen=True, eq=False)
class Value(Pattern):
    """A non-tensor argument of a given Python type (dtype, str), optionally from `allowed`."""

    kind: type = object
    allowed: frozenset | None = None
    name: str | None = None

    def __repr__(self) -> str:
        what = self.kind.__name__
        if self.allowed is not None:
            what += " in {" + ", ".join(sorted(map(_text, self.allowed))) + "}"
        return f"{what} {self.name}" if self.name else what


@dataclass(frozen=True, eq=False)
class Literal(Pattern):
    value: Any
    name: str | None = None

    def __repr__(self) -> str:
        return _text(self.value)


@dataclass(frozen=True, eq=False)
class Dims(Pattern):
    """A list of dims, compared after normalising negatives against the input tensor's rank."""

    dims: tuple
    name: str | None = None

    def __repr__(self) -> str:
        return f"dims {list(self.dims)}"


@dataclass(frozen=True, eq=False)
class Alt(Pattern):
    options: tuple
    name: str | None = None

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.options))


@dataclass(frozen=True, eq=False)
class Through(Pattern):
    """`inner`, possibly behind a chain of pass-through nodes (casts, clones, identity views),
    which become interior nodes of the match."""

    inner: Pattern
    targets: frozenset
    name: str | None = None

    def __repr__(self) -> str:
        return f"[{_targets_text(self.targets)}]* {self.inner!r}"

    def step(self, node: Node) -> Node | None:
        """The value `node` passes on, or None."""
        passes = (
            node.op == "call_function" and node.target in self.targets and _passes_through(node)
        )
        return node.args[0] if passes else None


@dataclass(frozen=True, eq=False)
class Behind(Pattern):
    """`inner`, possibly behind a chain of nodes that each pass a value on: `step(node)` is the
    argument the chain continues through, or the reason `node` does not pass. Chain nodes may
    have users outside the match: the rewrite handles them."""

    inner: Pattern
    step: Callable[[Node], Any]
    doc: str = ""
    name: str | None = None

    def __repr__(self) -> str:
        return f"[{self.doc or 'passing'}]* {self.inner!r}"


@dataclass(frozen=True, eq=False)
class Anything(Pattern):
    name: str | None = None

    def __repr__(self) -> str:
        return "anything"


# ---------------------------------------------------------------------------------------------
# Builders (the DSL)
# ---------------------------------------------------------------------------------------------

COMMUTATIVE = frozenset({aten.add.Tensor, aten.mul.Tensor, aten.add.Scalar, aten.mul.Scalar})
ADD = frozenset({aten.add.Tensor, aten.add.Scalar})
MUL = frozenset({aten.mul.Tensor, aten.mul.Scalar})
CAST = frozenset({prims.convert_element_type.default, aten._to_copy.default})
CLONE = frozenset({aten.clone.default})
VIEW = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
PASS_THROUGH = CAST | CLONE | VIEW


def op(target: Any, *args: Any, name: str | None = None, **kwargs: Any) -> Op:
    """A call of `target` (one op, or a set of alternatives) with argument patterns.

    Plain Python values in `args` are literals. Schema arguments the pattern leaves out must hold
    their default value in the graph (use `anything()` to accept any value). Two-operand
    add/mul match their operands in either order.
    """
    targets = (
        frozenset(target)
        if isinstance(target, (set, frozenset, list, tuple))
        else frozenset({target})
    )
    args = tuple(_as_pattern(a) for a in args)
    kwargs = {k: _as_pattern(v) for k, v in kwargs.items()}
    return Op(
        targets, args, kwargs, commutative=targets <= COMMUTATIVE and len(args) == 2, name=name
    )


def tensor(
    name: str | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    where: Callable[[Node], bool] | None = None,
    doc: str = "",
) -> Tensor:
    """A node, of a dtype in `dtypes` (if given), for which `where(node)` holds (if given)."""
    return Tensor(name, frozenset(dtypes) if dtypes is not None else None, where, doc)


def scalar(
    name: str | None = None,
    lo: float = -math.inf,
    hi: float = math.inf,
    where: Callable[[Any], bool] | None = None,
    doc: str = "",
) -> Scalar:
    """A number in (lo, hi]; `where` adds any other predicate, `doc` says it in words."""
    return Scalar(name, lo, hi, where, doc)


def dtype(name: str | None = None, allowed: Iterable[torch.dtype] | None = None) -> Value:
    return Value(torch.dtype, frozenset(allowed) if allowed is not None else None, name)


def string(name: str | None = None, allowed: Iterable[str] | None = None) -> Value:
    return Value(str, frozenset(allowed) if allowed is not None else None, name)


def literal(value: Any, name: str | None = None) -> Literal:
    return Literal(value, name)


def dims(values: Iterable[int], name: str | None = None) -> Dims:
    return Dims(tuple(values), name)


def alt(*options: Pattern, name: str | None = None) -> Alt:
    """Whole-subpattern alternation: the first option that matches wins, then the next, ..."""
    flat: list[Pattern] = []
    for o in options:
        flat.extend(o.options if isinstance(o, Alt) and o.name is None else (o,))
    return Alt(tuple(flat), name)


def through(inner: Pattern, targets: Iterable = PASS_THROUGH, name: str | None = None) -> Through:
    """`inner`, optionally behind pass-through nodes (default: casts, clones, identity views)."""
    return Through(inner, frozenset(targets), name)


def behind(
    inner: Pattern, step: Callable[[Node], Any], doc: str = "", name: str | None = None
) -> Behind:
    """`inner`, optionally behind nodes that pass a value on (see `Behind`); `name` binds what
    the consumer sees. `doc` says in words which nodes pass, for near-misses."""
    return Behind(inner, step, doc, name)


def such_that(pattern: Op | Alt, where: Callable[[Node], bool], doc: str) -> Op | Alt:
    """`pattern` (an op, or alternative ops) matching only a node for which `where(node)` holds,
    asked before the node's arguments are matched; `doc` says what it asks, in words."""
    if isinstance(pattern, Alt):
        return replace(pattern, options=tuple(such_that(o, where, doc) for o in pattern.options))
    return replace(pattern, where=where, doc=doc)


def anything(name: str | None = None) -> Anything:
    return Anything(name)


def getitem(pattern: Pattern, index: int, name: str | None = None) -> Op:
    return op(operator.getitem, pattern, index, name=name)


def _as_pattern(value: Any) -> Pattern:
    return value if isinstance(value, Pattern) else Literal(value)


def _passes_through(node: Node) -> bool:
    """Views and reshapes pass through only when they keep the shape; casts and clones always."""
    if node.target not in VIEW:
        return True
    a, o = tensor_of(node.args[0]), tensor_of(node)
    return a is not None and o is not None and tuple(a.shape) == tuple(o.shape)


# Marks a schema argument the graph leaves out and that has no default.
_NO_DEFAULT = object()


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _targets_text(targets: Iterable) -> str:
    return " | ".join(sorted(target_name(t) for t in targets))


def target_name(target: Any) -> str:
    """Qualified op name: `aten.add.Tensor`, `prims.convert_element_type.default`,
    `operator.getitem`."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    module = {"_operator": "operator"}.get(module, module)
    return f"{module}.{name}" if module else name


def _text(value: Any) -> str:
    if isinstance(value, Node):
        return value.name
    if isinstance(value, torch.dtype):
        return str(value)
    if value is _NO_DEFAULT:
        return "<missing>"
    return repr(value)


def _range_text(lo: float, hi: float) -> str:
    if lo == -math.inf and hi == math.inf:
        return ""
    return f"in ({lo!r}, {hi!r}]"
