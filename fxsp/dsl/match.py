"""The matcher: where a pattern (`pattern.py`) matches a graph, and why not where it does not.

Matching a pattern at a node yields every consistent set of bindings (backtracking over
commutative operands and alternatives). Each failed check is reported to a `Trace`, which keeps
the deepest one: the near-miss that `explain` prints, with the path from the root to where it
failed, e.g. `arg 1 (mul) → arg 1 (sqrt): expected aten.rsqrt.default, got aten.sqrt.default`
(argument 1 of the root is the node `mul`, whose argument 1 is `sqrt`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.fx import Node

from .fake import tensor_of
from .pattern import (
    _NO_DEFAULT,
    Alt,
    Anything,
    Behind,
    Dims,
    Literal,
    Op,
    Pattern,
    Scalar,
    Tensor,
    Through,
    Value,
    _text,
    target_name,
)

# Where a check happens: None at the root, else (parent path, argument position or name, the
# graph value found there). Linked, so descending costs one tuple; printed only when asked.
Path = tuple | None


@dataclass
class Miss:
    """One failed check: after `depth` pattern steps, `pattern` did not accept `got` at `node`,
    reached from the root through `path` (argument positions and the nodes found there)."""

    depth: int
    expected: str
    got: str
    node: Node | None
    path: Path = None

    def text(self) -> str:
        where = _path_text(self.path)
        return f"{where + ': ' if where else ''}expected {self.expected}, got {self.got}"


class Trace:
    """Keeps the deepest failure seen while matching one anchor. Its texts are written when
    `best` is read: most failures are never the deepest, and most anchors' are never read."""

    def __init__(self) -> None:
        self._deepest: tuple | None = None  # fail's arguments
        self._best: Miss | None = None

    def fail(
        self, depth: int, expected: Any, got: Any, node: Node | None, path: Path = None
    ) -> None:
        if self._deepest is None or depth > self._deepest[0]:
            self._deepest, self._best = (depth, expected, got, node, path), None

    @property
    def depth(self) -> int | None:
        """The deepest failure's depth (None: nothing failed)."""
        return self._deepest[0] if self._deepest is not None else None

    @property
    def best(self) -> Miss | None:
        if self._best is None and self._deepest is not None:
            depth, expected, got, node, path = self._deepest
            self._best = Miss(
                depth,
                expected if isinstance(expected, str) else repr(expected),
                got if isinstance(got, str) else _text(got),
                node,
                path,
            )
        return self._best


def _path_text(path: Path) -> str:
    hops = []
    while path is not None:
        path, key, value = path
        hop = f"arg {key}" if isinstance(key, int) else key
        name = getattr(value, "name", None)  # a Node, or its name read back from a report's JSON
        hops.append(f"{hop} ({name})" if isinstance(name, str) else hop)
    return " → ".join(reversed(hops))


@dataclass
class Bindings:
    """What a (partial) match has bound so far. Copied on extension, so backtracking is free."""

    values: dict = field(default_factory=dict)
    nodes: tuple = ()  # graph nodes matched by Op/Through/Behind patterns: the match's interior
    depth: int = 0
    shared: tuple = ()  # interior nodes whose other users the rewrite handles (Behind's chain)

    def bind(self, name: str | None, value: Any) -> Bindings | None:
        if name is None:
            return self
        if name in self.values:
            return self if _same(self.values[name], value) else None
        return Bindings({**self.values, name: value}, self.nodes, self.depth, self.shared)

    def step(self, node: Node | None = None, shared: bool = False) -> Bindings:
        nodes = self.nodes + (node,) if node is not None else self.nodes
        return Bindings(
            self.values, nodes, self.depth + 1, self.shared + (node,) if shared else self.shared
        )


def match(
    pattern: Pattern,
    value: Any,
    b: Bindings,
    trace: Trace,
    owner: Node | None = None,
    path: Path = None,
) -> Iterator[Bindings]:
    """Yield every extension of `b` under which `pattern` matches `value`.

    `owner` is the op node whose first input's rank a `Dims` pattern's dims refer to (asked
    only when a `Dims` is matched); `path` is where
    `value` sits, for the failures reported to `trace`.
    """
    kind = type(pattern)
    if kind is Op:
        yield from _match_op(pattern, value, b, trace, path)
        return
    if kind is Alt:
        for option in pattern.options:
            for found in match(option, value, b, trace, owner, path):
                out = found.bind(pattern.name, value)
                if out is not None:
                    yield out
        return
    if kind is Through or kind is Behind:
        yield from _match_chain(pattern, value, b, trace, owner, path)
        return
    out = _match_leaf(pattern, value, b, trace, owner, path)
    if out is not None:
        yield out


def _match_leaf(
    pattern: Pattern, value: Any, b: Bindings, trace: Trace, owner: Node | None, path: Path
) -> Bindings | None:
    """`match` for a leaf pattern, which matches one way or not at all: the extended bindings,
    or None."""
    kind = type(pattern)
    rank = _rank(owner) if kind is Dims and owner is not None else None
    reason = _check_leaf(pattern, value, rank)
    if reason is not None:
        # Other values are put in words when the failure is read.
        got = repr(value) if isinstance(value, str) else value  # quoted, 'max', unlike a reason
        trace.fail(b.depth, reason, got, value if isinstance(value, Node) else None, path)
        return None
    out = b.bind(pattern.name, tuple(_normalise_dims(value, rank)) if kind is Dims else value)
    if out is None:
        earlier = _text(b.values[pattern.name])
        trace.fail(b.depth, f"{pattern.name} = {earlier} (bound earlier)", _text(value), None, path)
        return None
    return out.step()


def _check_leaf(pattern: Pattern, value: Any, rank: int | None) -> str | None:
    """None when the leaf pattern accepts `value`, else what it expected."""
    kind = type(pattern)
    if kind is Anything:
        return None
    if kind is Tensor:
        if not isinstance(value, Node):
            return repr(pattern)
        if (
            pattern.dtypes is not None
            and getattr(tensor_of(value), "dtype", None) not in pattern.dtypes
        ):
            return f"{pattern!r} of dtype in {{{', '.join(sorted(map(_text, pattern.dtypes)))}}}"
        return (
            None
            if pattern.where is None or pattern.where(value)
            else f"{pattern!r} {pattern.doc}".strip()
        )
    if kind is Scalar:
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and pattern.lo < value <= pattern.hi
            and (pattern.where is None or pattern.where(value))
        )
        return None if ok else repr(pattern)
    if kind is Value:
        ok = isinstance(value, pattern.kind) and (
            pattern.allowed is None or value in pattern.allowed
        )
        return None if ok else repr(pattern)
    if kind is Literal:
        return None if _same(pattern.value, value) else repr(pattern)
    if kind is Dims:
        got = _normalise_dims(value, rank)
        want = _normalise_dims(pattern.dims, rank)
        return None if got is not None and got == want else repr(pattern)
    raise TypeError(f"not a pattern: {pattern!r}")


def _normalise_dims(value: Any, rank: int | None) -> list | None:
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) for d in value):
        return None
    if rank is None:
        return list(value)
    return sorted(d % rank if rank else d for d in value)


def _match_op(pattern: Op, node: Any, b: Bindings, trace: Trace, path: Path) -> Iterator[Bindings]:
    if (
        not isinstance(node, Node)
        or node.op != "call_function"
        or id(node.target) not in pattern.target_ids
    ):
        got = (
            _CallOf(node.target) if isinstance(node, Node) and node.op == "call_function" else node
        )
        trace.fail(b.depth, pattern, got, node if isinstance(node, Node) else None, path)
        return
    if pattern.where is not None and not pattern.where(node):
        trace.fail(b.depth, f"{pattern!r} {pattern.doc}".strip(), node.name, node, path)
        return
    if pattern.name is not None and pattern.name in b.values and b.values[pattern.name] is not node:
        earlier = b.values[pattern.name]
        trace.fail(b.depth, f"{pattern.name} = {earlier} (bound earlier)", node.name, node, path)
        return
    try:
        actual, extra = _arguments(node, pattern)
    except _ArityMismatch as e:
        trace.fail(b.depth, f"{pattern!r} with {e}", node.name, node, path)
        return
    # Where each value sits in the node, for the path: its position, or its schema name.
    keys = [*range(len(pattern.args)), *(k for k, _ in extra)]
    orders = [(actual, keys)]
    if pattern.commutative:
        orders.append(([actual[1], actual[0]] + actual[2:], [keys[1], keys[0], *keys[2:]]))
    start = b.bind(pattern.name, node)
    if start is None:
        return
    start = start.step(node)
    expected = list(pattern.args) + [pattern.kwargs.get(k, Literal(d)) for k, d in extra]
    for values, where in orders:
        yield from _match_args(expected, values, where, 0, start, trace, node, path)


def _match_args(
    patterns: list,
    values: list,
    where: list,
    i: int,
    b: Bindings,
    trace: Trace,
    owner: Node,
    path: Path,
) -> Iterator[Bindings]:
    # Leaves match one way or not at all: taken in this loop, without a generator each.
    while i < len(patterns) and type(patterns[i]) in _LEAVES:
        b = _match_leaf(patterns[i], values[i], b, trace, owner, (path, where[i], values[i]))
        if b is None:
            return
        i += 1
    if i == len(patterns):
        yield b
        return
    for found in match(patterns[i], values[i], b, trace, owner, (path, where[i], values[i])):
        yield from _match_args(patterns, values, where, i + 1, found, trace, owner, path)


_LEAVES = frozenset({Tensor, Scalar, Value, Literal, Dims, Anything})


def _match_chain(
    pattern: Through | Behind, value: Any, b: Bindings, trace: Trace, owner: Node | None, path: Path
) -> Iterator[Bindings]:
    """`pattern.inner` at `value`, or behind the chain of nodes `pattern.step` walks back through.
    A Behind's chain nodes may have other users (the rewrite handles them), and the node that
    stops its chain can be the near-miss; a Through's are the match's own."""
    shared = type(pattern) is Behind
    at, outer = b, value
    while True:
        for found in match(pattern.inner, value, at, trace, owner, path):
            # The name binds what the consumer sees: the value before any node walked through.
            out = found.bind(pattern.name, outer)
            if out is not None:
                yield out
        if not isinstance(value, Node):
            return
        nxt = pattern.step(value)
        if not isinstance(nxt, Node):
            if shared:
                _blocked(pattern, value, str(nxt), at, trace, owner, path)
            return
        at = at.step(value, shared)
        key = next((i for i, a in enumerate(value.args) if a is nxt), "input")
        path, value = (path, key, nxt), nxt


def _blocked(
    pattern: Behind,
    node: Node,
    reason: str,
    at: Bindings,
    trace: Trace,
    owner: Node | None,
    path: Path,
    hops: int = 4,
) -> None:
    """`node` does not pass. When `inner` matches right behind it (within `hops` nodes), that
    is the near-miss: the node standing between them, as deep as the match behind it went."""
    seen, frontier = {node}, [node]
    for _ in range(hops):
        frontier = [
            a for n in frontier for a in n.all_input_nodes if a not in seen and not seen.add(a)
        ]
        for candidate in frontier:
            for found in match(pattern.inner, candidate, at.step(), Trace(), owner):
                expected = f"{pattern.doc or 'passing nodes'} after {candidate.name}"
                trace.fail(
                    found.depth,
                    expected,
                    f"{target_name(node.target)} {node.name}: {reason}",
                    node,
                    path,
                )
                return


# ---------------------------------------------------------------------------------------------
# Arguments by schema: positional args, then kwargs, then schema defaults
# ---------------------------------------------------------------------------------------------


class _ArityMismatch(Exception):
    pass


def _layout(target: Any, count: int, names: tuple) -> tuple[tuple | None, list]:
    """Per op and pattern, not per node (`Op.layouts` keeps it): its schema arguments (None
    without a schema), and the (name, default) of those after the first `count` that must match
    the patterns `names` or keep their defaults."""
    schema = getattr(target, "_schema", None)
    if schema is None:  # e.g. higher-order ops: kwargs only by name
        return None, [(name, _NO_DEFAULT) for name in sorted(names)]
    arguments = tuple(
        (a.name, a.default_value if a.has_default_value() else _NO_DEFAULT)
        for a in schema.arguments
    )
    return arguments, [
        (name, default)
        for name, default in arguments[count:]
        if name in names or default is not _NO_DEFAULT
    ]


def _arguments(node: Node, pattern: Op) -> tuple[list, list]:
    """The node's arguments for `pattern`'s positional ones, filling kwargs and defaults from
    the op schema, then its arguments the schema has after those (see `_layout`); and those
    (name, default) pairs."""
    count, args, kwargs = len(pattern.args), node.args, node.kwargs
    layout = pattern.layouts.get(id(node.target))  # the target is one of the pattern's own
    if layout is None:
        layout = pattern.layouts[id(node.target)] = _layout(
            node.target, count, tuple(pattern.kwargs)
        )
    schema, extra = layout
    out = list(args[:count])
    for i in range(len(out), count):
        if schema is None or i >= len(schema):
            raise _ArityMismatch(f"{count} arguments")
        name, default = schema[i]
        out.append(kwargs.get(name, default))
    # Without a schema there are no defaults: every kwarg must be one the pattern names.
    if schema is None and (len(args) > count or set(kwargs) - set(pattern.kwargs)):
        raise _ArityMismatch(f"{count} arguments")
    for name, _ in extra:
        out.append(_named_argument(node, name, schema))
    return out, extra


def _named_argument(node: Node, name: str, schema: tuple | None) -> Any:
    for i, (arg, default) in enumerate(schema or ()):
        if arg == name:
            return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
    return node.kwargs.get(name, _NO_DEFAULT)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _rank(node: Node) -> int | None:
    val = tensor_of(node.args[0]) if node.args else None
    return val.dim() if val is not None else None


def _same(a: Any, b: Any) -> bool:
    """Equality for bindings: nodes by identity, sequences elementwise, bools never equal ints."""
    if isinstance(a, Node) or isinstance(b, Node):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is None or b is None or isinstance(a, bool) != isinstance(b, bool):
        return a is b
    try:
        return bool(a == b)
    except Exception:
        return False


@dataclass(frozen=True)
class _CallOf:
    """A call of `target` found where a pattern wanted another op: printed as the op's name."""

    target: Any

    def __repr__(self) -> str:
        return target_name(self.target)
