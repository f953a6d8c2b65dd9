"""Property: on any chain of elementwise ops, rewriting x*2 → x+x rewrites every `*2` (the
literal on either side), keeps the numerics and leaves a graph that lints."""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from fxsp import Rule, RuleSet, op, tensor

aten = torch.ops.aten

DOUBLE = Rule(
    "x*2 -> x+x",
    op(aten.mul.Tensor, tensor("x"), 2),
    lambda b, m: b.call(aten.add.Tensor, m["x"], m["x"]),
)

# (op name, other operand, literal first): "y" is a second input that broadcasts against the
# first; 2.0 equals the literal 2, so it counts as a doubling too.
steps = st.tuples(
    st.sampled_from(["add", "sub", "mul", "neg", "relu"]),
    st.sampled_from([2, 2.0, 3, -1.5, "y"]),
    st.booleans(),
)
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3)


def is_doubling(step) -> bool:
    name, other, _ = step
    return name == "mul" and other == 2


def chain(program):
    """The function that applies `program` to x, with y as the tensor operand."""

    def fn(x, y):
        h = x
        for name, other, literal_first in program:
            operand = y if other == "y" else other
            if name in ("neg", "relu"):
                h = getattr(torch, name)(h)
            elif literal_first:
                # Calling the overload keeps a literal as the first argument.
                overload = getattr(aten, name).Tensor
                h = overload(operand, h) if other != "y" else overload(y, h)
            else:
                h = getattr(torch, name)(h, operand)
        return h

    return fn


@settings(max_examples=50, deadline=None)
# Both operand orders, for sure: `2 * h` written as mul.Tensor(2, h), and 2.0 after.
@example(
    program=[("mul", 2, True), ("relu", 3, False), ("mul", 2.0, False)],
    shape=[2, 3],
    suffix=1,
    seed=0,
)
@given(
    program=st.lists(steps, min_size=1, max_size=8),
    shape=shapes,
    suffix=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_double_to_add_keeps_numerics(program, shape, suffix, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    y = torch.randn(shape[len(shape) - min(suffix, len(shape)) :], generator=generator)
    gm = make_fx(chain(program))(x, y)
    expected = gm(x, y)

    report = RuleSet("double", [DOUBLE]).apply(gm, check=True)

    gm.graph.lint()
    assert report.counts["x*2 -> x+x"] == sum(map(is_doubling, program))
    assert not any(n.target is aten.mul.Tensor and 2 in n.args for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x, y), expected, rtol=0, atol=0)
