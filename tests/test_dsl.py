"""The fxsp pattern DSL, feature by feature: captures, alternatives, pass-through nodes,
commutativity, dims, schema defaults, named outputs, containment and cycles, rule-set order,
the builder, dead-code removal, explanations, reports and logging."""

from __future__ import annotations

import logging
import operator
import re
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._python_dispatch import TorchDispatchMode

import fxsp
from fxsp import (
    ADD,
    MUL,
    Builder,
    Rule,
    RuleSet,
    alt,
    anything,
    dims,
    dtype,
    getitem,
    literal,
    op,
    scalar,
    string,
    such_that,
    tensor,
    through,
)

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def trace(fn, *shapes, dtype: torch.dtype = torch.float32) -> GraphModule:
    """make_fx of `fn` on random inputs of the given shapes."""
    return make_fx(fn)(*(torch.randn(s, dtype=dtype) for s in shapes))


def hand_graph(build, *shapes) -> GraphModule:
    """A graph written node by node: `build(graph, *inputs)` returns the output node(s).
    `meta["val"]` is filled by fake-tensor propagation, as make_fx would."""
    graph = Graph()
    inputs = [graph.placeholder(f"in{i}") for i in range(len(shapes))]
    graph.output(build(graph, *inputs))
    gm = GraphModule({}, graph)
    mode = FakeTensorMode()
    FakeTensorProp(gm, mode).propagate(*(mode.from_tensor(torch.randn(s)) for s in shapes))
    return gm


def call(graph: Graph, target, *args, **kwargs):
    return graph.call_function(target, args, kwargs)


def matches(pattern, gm: GraphModule, **rule_options) -> list:
    """Every match of `pattern` in `gm`, found without rewriting anything."""
    rule = Rule("probe", pattern, lambda b, m: None, **rule_options)
    return [
        m
        for n in gm.graph.nodes
        if n.op == "call_function"
        for m in [rule.match_at(n, fxsp.dsl.match.Trace())]
        if m is not None
    ]


def near_miss(pattern, gm: GraphModule, **rule_options) -> str:
    """The explanation fxsp gives for `pattern` not matching `gm` (which must not match)."""
    report = RuleSet("probe", [Rule("probe", pattern, lambda b, m: None, **rule_options)]).apply(gm)
    assert report.counts == {"probe": 0}
    return str(report.misses["probe"])


def targets(gm: GraphModule) -> list[str]:
    return [
        fxsp.dsl.pattern.target_name(n.target) for n in gm.graph.nodes if n.op == "call_function"
    ]


def hf_rms_norm(x, w, eps: float = 1e-6, rsqrt=torch.rsqrt):
    """RMSNorm as Hugging Face models write it."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return w * (x * rsqrt(variance + eps))


def hf_rms_norm_pattern():
    x, w = tensor("x"), tensor("w")
    variance = op(aten.mean.dim, op(aten.pow.Tensor_Scalar, x, 2), dims([-1]), True)
    inverse_rms = op(aten.rsqrt.default, op(ADD, variance, scalar("eps", 0.0, 1e-2)))
    return op(MUL, w, op(MUL, x, inverse_rms))


def to_rms_norm(b: Builder, m) -> torch.fx.Node:
    hidden = m["x"].meta["val"].shape[-1]
    return b.call(aten.rms_norm.default, m["x"], [hidden], m["w"], m["eps"])


RMS_RULE = Rule("hf_rms_norm", hf_rms_norm_pattern(), to_rms_norm)
DOUBLE_RULE = Rule(
    "x*2 -> x+x",
    op(aten.mul.Tensor, tensor("x"), 2),
    lambda b, m: b.call(aten.add.Tensor, m["x"], m["x"]),
)


# ---------------------------------------------------------------------------------------------
# Patterns are plain data
# ---------------------------------------------------------------------------------------------


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_building_patterns_and_rules_runs_no_op():
    with _RecordOps() as recorder:
        rules = RuleSet(
            "norms", [Rule(f"rms{i}", hf_rms_norm_pattern(), to_rms_norm) for i in range(5)]
        )
    assert recorder.ops == []
    assert rules.rules[0].anchors() == MUL


def test_duplicate_rule_names_are_refused():
    with pytest.raises(ValueError, match="duplicate rule names"):
        RuleSet("twice", [DOUBLE_RULE, DOUBLE_RULE])


def test_root_must_be_an_op():
    with pytest.raises(TypeError, match="root must be an op pattern"):
        Rule("bad", tensor("x"), lambda b, m: None).anchors()


# ---------------------------------------------------------------------------------------------
# Captures
# ---------------------------------------------------------------------------------------------


def test_tensor_scalar_and_dims_captures_bind_graph_values():
    gm = trace(lambda x, w: hf_rms_norm(x, w), (4, 8), (8,))
    [m] = matches(hf_rms_norm_pattern(), gm)
    x, w = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert m["x"] is x and m["w"] is w
    assert m["eps"] == 1e-6
    assert m.root is gm.graph.output_node().args[0]
    assert set(m.nodes) == {n for n in gm.graph.nodes if n.op == "call_function"}


def test_named_dims_bind_their_normalised_value():
    gm = trace(lambda x: x.sum([-1, 0]), (4, 8))
    [m] = matches(op(aten.sum.dim_IntList, tensor("x"), dims([0, 1], name="reduced")), gm)
    assert m["reduced"] == (0, 1)


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 1e-2])
def test_scalar_predicate_accepts_eps_in_range(eps):
    gm = trace(lambda x, w: hf_rms_norm(x, w, eps), (4, 8), (8,))
    [m] = matches(hf_rms_norm_pattern(), gm)
    assert m["eps"] == eps


def test_scalar_predicate_rejects_eps_out_of_range():
    gm = trace(lambda x, w: hf_rms_norm(x, w, eps=0.1), (4, 8), (8,))
    assert matches(hf_rms_norm_pattern(), gm) == []
    assert near_miss(hf_rms_norm_pattern(), gm) == (
        "probe at mul_1: arg 1 (mul) → arg 1 (rsqrt) → arg 0 (add) → arg 1: "
        "expected scalar eps in (0.0, 0.01], got 0.1"
    )


def test_scalar_where_predicate_and_doc():
    power_of_two = scalar("k", where=lambda v: v > 0 and (v & (v - 1)) == 0, doc="a power of two")
    pattern = op(aten.mul.Tensor, tensor("x"), power_of_two)
    assert len(matches(pattern, trace(lambda x: x * 4, (3,)))) == 1
    assert near_miss(pattern, trace(lambda x: x * 3, (3,))) == (
        "probe at mul: arg 1: expected scalar k a power of two, got 3"
    )


def test_scalar_does_not_accept_a_tensor_or_a_bool():
    pattern = op(aten.mul.Tensor, tensor("x"), scalar("k"))
    assert matches(pattern, trace(lambda x, y: x * y, (3,), (3,))) == []
    assert matches(pattern, hand_graph(lambda g, x: call(g, aten.mul.Tensor, x, True), (3,))) == []


def test_name_bound_twice_must_bind_the_same_node():
    pattern = op(aten.add.Tensor, tensor("x"), tensor("x"))
    [m] = matches(pattern, trace(lambda x: x + x, (3,)))
    assert m["x"].op == "placeholder"
    gm = trace(lambda x, y: x + y, (3,), (3,))
    assert matches(pattern, gm) == []
    # Tried in both orders (add is commutative); both fail the same way at the same depth.
    assert near_miss(pattern, gm) == (
        "probe at add: arg 1 (y_1): expected x = x_1 (bound earlier), got y_1"
    )


def test_name_bound_twice_in_a_deep_pattern():
    # Same chain as RMSNorm, but the variance is taken of another tensor.
    gm = trace(
        lambda x, y, w: w * (x * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)),
        (4, 8),
        (4, 8),
        (8,),
    )
    assert matches(hf_rms_norm_pattern(), gm) == []
    assert near_miss(hf_rms_norm_pattern(), gm) == (
        "probe at mul_1: arg 1 (mul) → arg 1 (rsqrt) → arg 0 (add) → arg 0 (mean) → "
        "arg 0 (pow_1) → arg 0 (y_1): expected x = x_1 (bound earlier), got y_1"
    )


def square_of_negation(x):
    negated = -x
    return negated * negated


def test_name_bound_twice_across_ops_binds_the_same_op_node():
    negated = op(aten.neg.default, tensor("x"), name="negated")
    pattern = op(aten.mul.Tensor, negated, negated)
    [m] = matches(pattern, trace(square_of_negation, (3,)))
    assert m.root.args == (m["negated"], m["negated"])
    assert matches(pattern, trace(lambda x: (-x) * (-x), (3,))) == []  # two distinct neg nodes


def test_dtype_capture_with_allowed_set():
    pattern = op(aten._to_copy.default, tensor("x"), dtype=dtype("to", allowed={torch.float32}))
    [m] = matches(pattern, trace(lambda x: x.float(), (3,), dtype=torch.float16))
    assert m["to"] is torch.float32
    gm = trace(lambda x: x.double(), (3,), dtype=torch.float16)
    assert matches(pattern, gm) == []
    assert near_miss(pattern, gm) == (
        "probe at _to_copy: dtype: expected dtype in {torch.float32} to, got torch.float64"
    )


def test_tensor_dtype_restriction():
    pattern = op(aten.neg.default, tensor("x", dtypes={torch.float16, torch.bfloat16}))
    assert len(matches(pattern, trace(lambda x: -x, (3,), dtype=torch.bfloat16))) == 1
    assert matches(pattern, trace(lambda x: -x, (3,))) == []
    assert near_miss(pattern, trace(lambda x: -x, (3,))) == (
        "probe at neg: arg 0 (x_1): expected tensor x of dtype in {torch.bfloat16, torch.float16}, "
        "got x_1"
    )


def test_tensor_where_predicate_and_doc():
    is_input = tensor("x", where=lambda n: n.op == "placeholder", doc="(a graph input)")
    pattern = op(aten.neg.default, is_input)
    assert len(matches(pattern, trace(lambda x: -x, (3,)))) == 1
    gm = trace(lambda x: -(x + 1), (3,))
    assert (
        near_miss(pattern, gm)
        == "probe at neg: arg 0 (add): expected tensor x (a graph input), got add"
    )


def test_such_that_asks_the_node_before_its_arguments():
    asked = []

    def single_user(node):
        asked.append(node.name)
        return len(node.users) == 1

    pattern = such_that(
        op(aten.neg.default, op(aten.exp.default, tensor("x"))), single_user, "(read once)"
    )
    assert len(matches(pattern, trace(lambda x: -x.exp(), (3,)))) == 1
    gm = trace(lambda x: (lambda n: (n.exp(), n.sin()))(-x), (3,))
    asked.clear()
    assert near_miss(pattern, gm) == "probe at neg: expected aten.neg.default (read once), got neg"
    assert asked == ["neg"]  # refused before its argument, a neg and no exp, was looked at
    # On alternatives, every option asks.
    either = such_that(
        alt(op(aten.neg.default, tensor("x")), op(aten.exp.default, tensor("x"))),
        single_user,
        "(read once)",
    )
    assert len(matches(either, trace(lambda x: -x.exp(), (3,)))) == 2


def test_string_capture_reads_group_names():
    def all_reduce(g, x):
        return call(g, c10d.wait_tensor.default, call(g, c10d.all_reduce.default, x, "sum", "tp0"))

    pattern = op(
        c10d.wait_tensor.default,
        op(c10d.all_reduce.default, tensor("x"), string(allowed={"sum"}), string("group")),
    )
    [m] = matches(pattern, hand_graph(all_reduce, (4, 8)))
    assert m["group"] == "tp0"

    def all_reduce_max(g, x):
        return call(g, c10d.wait_tensor.default, call(g, c10d.all_reduce.default, x, "max", "tp0"))

    assert near_miss(pattern, hand_graph(all_reduce_max, (4, 8))) == (
        "probe at wait_tensor_default: arg 0 (all_reduce_default) → arg 1: "
        "expected str in {'sum'}, "
        "got 'max'"
    )


def test_literals_compare_by_value_and_type():
    twice = trace(lambda x: x * 2, (3,))
    assert len(matches(op(aten.mul.Tensor, tensor(), literal(2)), twice)) == 1
    assert matches(op(aten.mul.Tensor, tensor(), 2), trace(lambda x: x * 3, (3,))) == []
    assert len(matches(op(aten.mul.Tensor, tensor(), 2.0), trace(lambda x: x * 2, (3,)))) == 1
    # A bool is not the int 1.
    assert (
        matches(
            op(aten.mul.Tensor, tensor(), 1),
            hand_graph(lambda g, x: call(g, aten.mul.Tensor, x, True), (3,)),
        )
        == []
    )


def test_anything_accepts_any_argument():
    pattern = op(aten.mul.Tensor, tensor("x"), anything("other"))
    assert len(matches(pattern, trace(lambda x: x * 3, (3,)))) == 1
    [m] = matches(pattern, trace(lambda x: x.exp() * 3, (3,)))
    assert m["other"] == 3


# ---------------------------------------------------------------------------------------------
# Dims and schema arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, found", [([-1], True), ([1], True), ([0], False), ([-2], False)])
def test_dims_are_normalised_against_the_tensor_rank(dim, found):
    gm = trace(lambda x: x.mean(dim, keepdim=True), (4, 8))
    assert bool(matches(op(aten.mean.dim, tensor(), dims([-1]), True), gm)) is found
    assert bool(matches(op(aten.mean.dim, tensor(), dims([1]), True), gm)) is found


def test_dims_differ_on_another_rank():
    # On a 3-D tensor, dim -1 is 2, not 1.
    gm = trace(lambda x: x.mean(-1, keepdim=True), (2, 4, 8))
    assert matches(op(aten.mean.dim, tensor(), dims([1]), True), gm) == []
    assert near_miss(op(aten.mean.dim, tensor(), dims([1]), True), gm) == (
        "probe at mean: arg 1: expected dims [1], got [-1]"
    )


def test_schema_arguments_left_out_must_be_at_their_defaults():
    with_dtype = trace(lambda x: x.mean(-1, keepdim=True, dtype=torch.float32), (4, 8))
    pattern = op(aten.mean.dim, tensor("x"), dims([-1]), True)
    assert len(matches(pattern, trace(lambda x: x.mean(-1, keepdim=True), (4, 8)))) == 1
    assert matches(pattern, with_dtype) == []
    assert near_miss(pattern, with_dtype) == (
        "probe at mean: dtype: expected None, got torch.float32"
    )
    # Unless the pattern says what the argument may be.
    [m] = matches(op(aten.mean.dim, tensor("x"), dims([-1]), True, dtype=dtype("acc")), with_dtype)
    assert m["acc"] is torch.float32


def test_left_out_keepdim_means_false():
    pattern = op(aten.mean.dim, tensor("x"), dims([-1]))
    assert len(matches(pattern, trace(lambda x: x.mean(-1), (4, 8)))) == 1
    assert matches(pattern, trace(lambda x: x.mean(-1, keepdim=True), (4, 8))) == []


def test_getitem_of_a_multi_output_op():
    gm = trace(lambda x: x.max(1).values.relu(), (4, 8))
    # make_fx keeps a dead getitem for the indices; as a user outside the match it would block it.
    gm.graph.eliminate_dead_code()
    maximum = op(aten.max.dim, tensor("x"), 1)
    [m] = matches(op(aten.relu.default, getitem(maximum, 0, name="values")), gm)
    assert m["values"].target is operator.getitem
    assert matches(op(aten.relu.default, getitem(maximum, 1)), gm) == []


# ---------------------------------------------------------------------------------------------
# Alternatives, pass-through nodes, commutativity
# ---------------------------------------------------------------------------------------------


def test_alternative_targets_for_one_node():
    pattern = op({aten.add.Tensor, aten.add.Scalar}, tensor("x"), 1)
    assert len(matches(pattern, trace(lambda x: x + 1, (3,)))) == 1  # add.Tensor(x, 1)
    assert len(matches(pattern, hand_graph(lambda g, x: call(g, aten.add.Scalar, x, 1), (3,)))) == 1
    assert matches(pattern, trace(lambda x: x - 1, (3,))) == []
    assert near_miss(
        op(aten.add.Tensor, tensor("x"), 1),
        hand_graph(lambda g, x: call(g, aten.sub.Tensor, x, 1), (3,)),
    ) == ("probe at -: expected an anchor node (aten.add.Tensor), got none in graph")


def test_whole_subpattern_alternation():
    variance = op(aten.mean.dim, op(aten.pow.Tensor_Scalar, tensor("x"), 2), dims([-1]), True)
    shifted = op(ADD, variance, scalar("eps"))
    inv_rms = alt(
        op(aten.rsqrt.default, shifted),
        op(aten.reciprocal.default, op(aten.sqrt.default, shifted)),
        name="inv_rms",
    )
    pattern = op(MUL, tensor("x"), inv_rms)
    rsqrt_graph = trace(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5), (4, 8))
    sqrt_graph = trace(
        lambda x: x * torch.reciprocal(torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)), (4, 8)
    )
    [a] = matches(pattern, rsqrt_graph)
    [b] = matches(pattern, sqrt_graph)
    assert a["inv_rms"].target is aten.rsqrt.default
    assert b["inv_rms"].target is aten.reciprocal.default
    assert a["eps"] == b["eps"] == 1e-5
    # The `|` operator spells the same thing.
    either = inv_rms.options[0] | inv_rms.options[1]
    assert len(matches(op(MUL, tensor("x"), either), sqrt_graph)) == 1


def neg_then(mid):
    """relu(mid(neg(x))): a pass-through candidate between two ops."""
    return lambda x: torch.relu(mid(-x))


@pytest.mark.parametrize(
    "name, mid",
    [
        ("none", lambda t: t),
        ("clone", torch.clone),
        ("cast", lambda t: t.to(torch.float16)),
        ("cast twice", lambda t: t.double().float()),
        ("identity view", lambda t: t.view(4, 8)),
        ("identity reshape then clone", lambda t: t.reshape(4, 8).clone()),
    ],
)
def test_through_skips_pass_through_nodes(name, mid):
    gm = trace(neg_then(mid), (4, 8))
    [m] = matches(op(aten.relu.default, through(op(aten.neg.default, tensor("x")), name="fed")), gm)
    assert m["fed"] is m.root.args[0]
    # Skipped nodes belong to the match (they are rewritten away with it).
    assert set(m.nodes) == {n for n in gm.graph.nodes if n.op == "call_function"}


def test_through_skips_prims_convert_element_type():
    def fn(g, x):
        negated = call(g, aten.neg.default, x)
        cast = call(g, torch.ops.prims.convert_element_type.default, negated, torch.float16)
        return call(g, aten.relu.default, cast)

    gm = hand_graph(fn, (4, 8))
    [m] = matches(op(aten.relu.default, through(op(aten.neg.default, tensor("x")))), gm)
    assert m["x"].op == "placeholder"


def test_non_identity_view_does_not_pass_through():
    gm = trace(neg_then(lambda t: t.view(32)), (4, 8))
    pattern = op(aten.relu.default, through(op(aten.neg.default, tensor("x"))))
    assert matches(pattern, gm) == []
    assert near_miss(pattern, gm) == (
        "probe at relu: arg 0 (view): expected aten.neg.default, got aten.view.default"
    )


def test_through_only_skips_the_listed_targets():
    gm = trace(neg_then(torch.clone), (4, 8))
    casts_only = through(op(aten.neg.default, tensor()), fxsp.CAST)
    assert matches(op(aten.relu.default, casts_only), gm) == []


def test_through_pass_through_node_used_elsewhere_blocks_the_match():
    def fn(x):
        y = (-x).clone()
        return torch.relu(y), y

    pattern = op(aten.relu.default, through(op(aten.neg.default, tensor())))
    assert matches(pattern, trace(fn, (4, 8))) == []


@pytest.mark.parametrize("order", ["mul first", "mul second"])
def test_commutative_operands_in_both_orders(order):
    add = (lambda x, y: (y * 2) + x) if order == "mul first" else (lambda x, y: x + (y * 2))
    gm = trace(add, (3,), (3,))
    [m] = matches(op(aten.add.Tensor, tensor("x"), op(aten.mul.Tensor, tensor("y"), 2)), gm)
    x, y = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert (m["x"], m["y"]) == (x, y)


def test_commutative_literal_operand_in_either_position():
    pattern = op(aten.mul.Tensor, tensor("x"), 2)
    two_first = hand_graph(lambda g, x: call(g, aten.mul.Tensor, 2, x), (3,))
    [m] = matches(pattern, two_first)
    assert m["x"].op == "placeholder"


def test_non_commutative_operands_keep_their_order():
    pattern = op(aten.sub.Tensor, tensor("x"), op(aten.mul.Tensor, tensor("y"), 2))
    assert len(matches(pattern, trace(lambda x, y: x - y * 2, (3,), (3,)))) == 1
    assert matches(pattern, trace(lambda x, y: y * 2 - x, (3,), (3,))) == []


# ---------------------------------------------------------------------------------------------
# Containment: named outputs, cycles, `where`
# ---------------------------------------------------------------------------------------------

PRODUCT_PLUS = op(
    aten.add.Tensor, op(aten.mul.Tensor, tensor("a"), tensor("b"), name="product"), tensor("c")
)


def fused_multiply_add(b: Builder, m):
    """a*b + c as addcmul, and the product (also used outside) as its own new node."""
    b.replace(m["product"], b.call(aten.mul.Tensor, m["b"], m["a"]))
    return b.call(aten.addcmul.default, m["c"], m["a"], m["b"])


def product_used_outside(a, b, c):
    product = a * b
    return product + c, product.relu()


def test_interior_node_used_outside_blocks_the_match():
    gm = trace(product_used_outside, (3,), (3,), (3,))
    assert matches(PRODUCT_PLUS, gm) == []
    assert near_miss(PRODUCT_PLUS, gm) == (
        "probe at add: expected a self-contained match, got mul also used by relu"
    )


def test_declared_output_may_be_used_outside_and_rewritten():
    gm = trace(product_used_outside, (3,), (3,), (3,))
    inputs = [torch.randn(3) for _ in range(3)]
    expected = gm(*inputs)
    rules = RuleSet("fma", [Rule("fma", PRODUCT_PLUS, fused_multiply_add, outputs=("product",))])
    assert rules.apply(gm, check=True).counts == {"fma": 1}
    assert targets(gm) == ["aten.mul.Tensor", "aten.addcmul.default", "aten.relu.default"]
    torch.testing.assert_close(gm(*inputs), expected)


def test_declared_output_whose_user_feeds_the_match_is_a_cycle():
    def fn(a, b):
        product = a * b
        return product + product.relu()  # relu(product) is the match input c

    gm = trace(fn, (3,), (3,))
    assert matches(PRODUCT_PLUS, gm, outputs=("product",)) == []
    assert near_miss(PRODUCT_PLUS, gm, outputs=("product",)) == (
        "probe at add: expected a self-contained match, got rewrite would create a cycle"
    )


def test_replaced_output_users_move_after_the_replacement():
    # `product.relu()` sits between the product and `c`, the latest input of the rewrite: the
    # replacement of `product` is built after `c`, so its users must follow it there.
    def fn(a, b, c):
        product = a * b
        early_user = product.relu()
        return product + c.exp(), early_user

    gm = trace(fn, (3,), (3,), (3,))
    inputs = [torch.randn(3) for _ in range(3)]
    expected = gm(*inputs)

    def fused(b: Builder, m):
        both = b.call(aten.addcmul.default, m["c"], m["a"], m["b"])
        b.replace(m["product"], b.call(aten.sub.Tensor, both, m["c"]))
        return both

    rules = RuleSet("fma", [Rule("fma", PRODUCT_PLUS, fused, outputs=("product",))])
    assert rules.apply(gm, check=True).counts == {"fma": 1}
    torch.testing.assert_close(gm(*inputs), expected)


def test_where_vetoes_a_match_with_a_reason():
    def small_only(m):
        return True if m["x"].meta["val"].numel() < 10 else f"{m['x'].name} is too large"

    pattern = op(aten.mul.Tensor, tensor("x"), 2)
    assert len(matches(pattern, trace(lambda x: x * 2, (3,)), where=small_only)) == 1
    assert near_miss(pattern, trace(lambda x: x * 2, (30,)), where=small_only) == (
        "probe at mul: expected the rule's condition, got x_1 is too large"
    )
    assert near_miss(pattern, trace(lambda x: x * 2, (3,)), where=lambda m: False) == (
        "probe at mul: expected the rule's condition, got `where` rejected the match"
    )


# ---------------------------------------------------------------------------------------------
# Rule sets: collection, order, overlap
# ---------------------------------------------------------------------------------------------


def remove_double_negation(b: Builder, m):
    return m["x"]


DOUBLE_NEG = Rule(
    "--x -> x", op(aten.neg.default, op(aten.neg.default, tensor("x"))), remove_double_negation
)
SPOILED = "expected an unchanged root, got a root erased by an earlier rewrite"


def test_overlapping_matches_first_in_topological_order_wins():
    # neg(neg(neg(x))): the matches at neg_1 and neg_2 share neg_1. The earlier one wins; the
    # later one, spoiled by it, is reported.
    gm = trace(lambda x: torch.neg(torch.neg(torch.neg(x))), (3,))
    report = RuleSet("negations", [DOUBLE_NEG]).apply(gm, check=True)
    assert report.counts == {"--x -> x": 1}
    assert targets(gm) == ["aten.neg.default"]
    assert [str(f) for f in report.failures] == [
        "--x -> x at neg_2: arg 0 (x_1): expected aten.neg.default, got x_1"
    ]
    torch.testing.assert_close(gm(torch.ones(3)), -torch.ones(3))


RELU_OF_DOUBLE = Rule(
    "relu(x*2)",
    op(aten.relu.default, op(aten.mul.Tensor, tensor("x"), 2)),
    lambda b, m: b.call(aten.mul.Tensor, b.call(aten.relu.default, m["x"]), 2),
)


def test_overlap_is_decided_by_where_matches_begin():
    # relu(exp(x)*2) begins at the exp, before the doubling rule's match begins (at the mul):
    # it wins although listed second, and the doubling match it spoils is reported.
    gm = trace(lambda x: torch.relu(x.exp() * 2), (3,))
    relu_then_double = Rule(
        "relu(exp(x)*2)",
        op(aten.relu.default, op(aten.mul.Tensor, op(aten.exp.default, tensor("x")), 2)),
        lambda b, m: b.call(aten.relu.default, m["x"]),
    )
    report = RuleSet("overlap", [DOUBLE_RULE, relu_then_double]).apply(gm, check=True)
    assert report.counts == {"x*2 -> x+x": 0, "relu(exp(x)*2)": 1}
    assert targets(gm) == ["aten.relu.default"]
    assert [str(f) for f in report.failures] == [f"x*2 -> x+x at mul: {SPOILED}"]


@pytest.mark.parametrize(
    "first, second", [(RELU_OF_DOUBLE, DOUBLE_RULE), (DOUBLE_RULE, RELU_OF_DOUBLE)]
)
def test_rule_order_breaks_ties_between_matches_beginning_at_the_same_node(first, second):
    gm = trace(lambda x: torch.relu(x * 2), (3,))
    inputs = torch.randn(3)
    expected = gm(inputs)
    report = RuleSet("overlap", [first, second]).apply(gm, check=True)
    assert report.counts == {first.name: 1, second.name: 0}
    assert [f.rule for f in report.failures] == [second.name]  # the spoiled match is reported
    torch.testing.assert_close(gm(inputs), expected)
    if first is DOUBLE_RULE:
        assert targets(gm) == ["aten.add.Tensor", "aten.relu.default"]
        assert str(report.misses[second.name]) == (
            "relu(x*2) at relu: arg 0 (add_tensor): expected aten.mul.Tensor, got aten.add.Tensor"
        )
    else:
        assert targets(gm) == ["aten.relu.default", "aten.mul.Tensor"]


def test_rule_order_breaks_ties_at_the_same_root():
    as_add = Rule(
        "as add",
        op(aten.mul.Tensor, tensor("x"), 2),
        lambda b, m: b.call(aten.add.Tensor, m["x"], m["x"]),
    )
    as_scalar_mul = Rule(
        "as mul.Scalar",
        op(aten.mul.Tensor, tensor("x"), scalar("k")),
        lambda b, m: b.call(aten.mul.Scalar, m["x"], m["k"]),
    )
    for first, second, target in [
        (as_add, as_scalar_mul, "aten.add.Tensor"),
        (as_scalar_mul, as_add, "aten.mul.Scalar"),
    ]:
        gm = trace(lambda x: x * 2, (3,))
        report = RuleSet("tie", [first, second]).apply(gm, check=True)
        assert report.counts == {first.name: 1, second.name: 0}
        assert targets(gm) == [target]
        assert [str(f) for f in report.failures] == [f"{second.name} at mul: {SPOILED}"]


def test_a_match_nothing_changed_is_not_matched_again():
    # Two independent x*k sites: each is matched once when collected; before its rewrite only
    # its checks run again (the leaf predicate counts the matching, `where` the checks).
    looked_at, checked = [], []
    k = scalar("k", where=lambda v: looked_at.append(v) or True)
    rule = Rule(
        "x*k -> x+x",
        op(aten.mul.Tensor, tensor("x"), k),
        lambda b, m: b.call(aten.add.Tensor, m["x"], m["x"]),
        where=lambda m: checked.append(m.root.name) or True,
    )
    gm = trace(lambda x, y: (x * 2, y * 2), (3,), (3,))
    assert RuleSet("once", [rule]).apply(gm, check=True).counts == {rule.name: 2}
    assert len(looked_at) == 2 and checked == ["mul", "mul_1", "mul", "mul_1"]


def test_a_match_an_earlier_rewrite_changed_is_matched_again():
    # neg(neg(x)) then neg(neg(that)) share nothing, but the first rewrite replaces the second
    # match's input: matched again, it binds the new node.
    double_neg = Rule(
        "--x -> x",
        op(aten.neg.default, op(aten.neg.default, tensor("x"))),
        lambda b, m: b.call(aten.relu.default, m["x"]),
    )
    gm = trace(lambda x: torch.neg(torch.neg(torch.neg(torch.neg(x)))), (3,))
    report = RuleSet("negations", [double_neg]).apply(gm, check=True)
    assert report.counts == {"--x -> x": 2}
    assert targets(gm) == ["aten.relu.default", "aten.relu.default"]
    torch.testing.assert_close(gm(-torch.ones(3)), torch.zeros(3))


def test_all_matches_are_collected_before_any_rewrite():
    # The rewrite produces a new x*2, which must not be matched again in the same pass.
    again = Rule(
        "x*2 -> (x*2)+0",
        op(aten.mul.Tensor, tensor("x"), 2),
        lambda b, m: b.call(aten.add.Tensor, b.call(aten.mul.Tensor, m["x"], 2), 0),
    )
    gm = trace(lambda x: x * 2, (3,))
    assert RuleSet("once", [again]).apply(gm, check=True).counts == {"x*2 -> (x*2)+0": 1}
    assert targets(gm) == ["aten.mul.Tensor", "aten.add.Tensor"]


def test_rewrite_of_a_long_chain_is_valid_after_every_step():
    gm = trace(lambda x: ((x * 2).relu() * 2).sin() * 2, (3,))
    inputs = torch.randn(3)
    expected = gm(inputs)
    report = RuleSet("double", [DOUBLE_RULE]).apply(gm, check=True)
    assert report.counts == {"x*2 -> x+x": 3}
    assert "aten.mul.Tensor" not in targets(gm)
    torch.testing.assert_close(gm(inputs), expected)


def test_apply_takes_a_bare_graph():
    gm = trace(lambda x: x * 2, (3,))
    assert RuleSet("double", [DOUBLE_RULE]).apply(gm.graph).counts == {"x*2 -> x+x": 1}
    gm.recompile()
    torch.testing.assert_close(gm(torch.ones(3)), torch.full((3,), 2.0))


# ---------------------------------------------------------------------------------------------
# Builder and dead-code removal
# ---------------------------------------------------------------------------------------------


def test_builder_inserts_after_the_latest_input_in_creation_order():
    gm = trace(lambda x, y: (x.sin(), y.cos()), (3,), (3,))
    x, y = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sin = next(n for n in gm.graph.nodes if n.target is aten.sin.default)
    cos = next(n for n in gm.graph.nodes if n.target is aten.cos.default)
    b = Builder(gm.graph)
    first = b.call(aten.mul.Tensor, sin, 2)
    second = b.call(aten.add.Tensor, sin, 1)  # same latest input: after `first`, not before it
    of_y = b.call(aten.neg.default, y)
    constant = b.call(aten.ones.default, [3])  # no node input: after the placeholders
    output = gm.graph.output_node()
    assert list(gm.graph.nodes) == [x, y, of_y, constant, sin, first, second, cos, output]
    assert [tuple(n.meta["val"].shape) for n in (first, second, of_y, constant)] == [(3,)] * 4
    gm.graph.lint()


def test_builder_fills_fake_values():
    gm = trace(lambda x, w: hf_rms_norm(x, w), (4, 8), (8,))
    RuleSet("norm", [RMS_RULE]).apply(gm, check=True)
    [norm] = [n for n in gm.graph.nodes if n.target is aten.rms_norm.default]
    val = norm.meta["val"]
    assert isinstance(val, torch._subclasses.fake_tensor.FakeTensor)
    assert (tuple(val.shape), val.dtype) == ((4, 8), torch.float32)


def test_builder_nodes_are_what_call_function_makes():
    """Builder skips create_node's own walk of the arguments, not what it records: the same
    name, arguments, users and kwargs as graph.call_function gives; a raw SymInt argument goes
    through create_node, so torch warns about it (or not) as it does for call_function."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    gm = trace(lambda x: x.sin(), (4, 8))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    built = Builder(gm.graph).call(aten.sum.dim_IntList, x, [1], keepdim=True)
    with gm.graph.inserting_after(built):
        plain = gm.graph.call_function(aten.sum.dim_IntList, (x, [1]), {"keepdim": True})
    assert (built.name, plain.name) == ("sum_dim_int_list", "sum_dim_int_list_1")
    assert (built.args, built.kwargs) == (plain.args, plain.kwargs)
    assert type(built.args[1]) is type(plain.args[1])  # an immutable_list in both
    assert built.all_input_nodes == plain.all_input_nodes == [x] and {built, plain} <= set(x.users)
    gm.graph.lint()

    rows = ShapeEnv().create_unbacked_symint()
    graph = Graph()
    y = graph.placeholder("y")
    with pytest.warns() as by_builder:
        Builder(graph).call(aten.view.default, y, [rows, 8])
        warnings.warn("one warning at least")
    with pytest.warns() as by_call_function:
        graph.call_function(aten.view.default, (y, [rows, 8]))
        warnings.warn("one warning at least")
    assert len(by_builder) == len(by_call_function)


def test_create_call_names_nodes_as_create_node_does():
    """create_call passes a cached name for the target; every node still gets the name
    create_node would give it, for odd targets too (a builtin's name, digits, a lambda)."""
    from fxsp.dsl.builder import create_call

    def layer_2(x):
        return x

    targets = [
        aten.add.Tensor,
        operator.getitem,
        max,
        layer_2,
        lambda x: x,
        aten.add.Tensor,
        max,
        layer_2,
        operator.getitem,
        aten.mm.default,
    ] * 3
    plain, fast = Graph(), Graph()
    for graph in (plain, fast):
        graph.placeholder("x")
        graph.placeholder("add_tensor_1")  # a name taken ahead of the counter
    for target in targets:
        plain.call_function(target, ())
        create_call(fast, target, (), {})
    assert [n.name for n in fast.nodes] == [n.name for n in plain.nodes]
    assert "max_1" in [n.name for n in plain.nodes]


def test_builder_handles_nodes_without_values():
    graph = Graph()
    x = graph.placeholder("x")
    graph.output(x)
    node = Builder(graph).call(aten.neg.default, x)
    assert "val" not in node.meta


def test_rms_norm_rule_rewrites_and_keeps_numerics():
    gm = trace(lambda x, w: hf_rms_norm(x, w), (4, 8), (8,))
    inputs = (torch.randn(4, 8), torch.randn(8))
    expected = gm(*inputs)
    report = RuleSet("norm", [RMS_RULE]).apply(gm, check=True)
    assert report.counts == {"hf_rms_norm": 1}
    assert targets(gm) == ["aten.rms_norm.default"]  # every matched node was erased
    torch.testing.assert_close(gm(*inputs), expected)


def test_dead_matched_collectives_are_erased():
    def reduce_then_relu(g, x):
        waited = call(g, c10d.wait_tensor.default, call(g, c10d.all_reduce.default, x, "sum", "tp"))
        return call(g, aten.relu.default, waited)

    gm = hand_graph(reduce_then_relu, (4, 8))
    all_reduce = op(c10d.all_reduce.default, tensor("x"), "sum", string("group"))
    pattern = op(aten.relu.default, op(c10d.wait_tensor.default, all_reduce))
    drop = Rule("drop all-reduce", pattern, lambda b, m: b.call(aten.relu.default, m["x"]))
    assert RuleSet("local", [drop]).apply(gm, check=True).counts == {"drop all-reduce": 1}
    assert targets(gm) == ["aten.relu.default"]


def test_only_matched_dead_nodes_are_erased():
    def fn(g, x):
        call(g, aten.sin.default, x)  # dead, but not part of any match
        return call(g, aten.mul.Tensor, x, 2)

    gm = hand_graph(fn, (3,))
    RuleSet("double", [DOUBLE_RULE]).apply(gm, check=True)
    assert sorted(targets(gm)) == ["aten.add.Tensor", "aten.sin.default"]


# ---------------------------------------------------------------------------------------------
# Explanations, reports, logging
# ---------------------------------------------------------------------------------------------


def test_explain_rms_norm_near_miss_points_into_the_pattern():
    gm = trace(lambda x, w: hf_rms_norm(x, w, rsqrt=lambda v: torch.sqrt(v)), (4, 8), (8,))
    report = RuleSet("norms", [RMS_RULE]).apply(gm)
    assert report.counts == {"hf_rms_norm": 0}
    assert str(report.misses["hf_rms_norm"]) == (
        "hf_rms_norm at mul_1: arg 1 (mul) → arg 1 (sqrt): expected aten.rsqrt.default, "
        "got aten.sqrt.default"
    )
    miss = report.misses["hf_rms_norm"].miss
    assert miss.node.target is aten.sqrt.default
    assert report.explain() == (
        "norms: hf_rms_norm=0\n"
        "  near-miss hf_rms_norm at mul_1: arg 1 (mul) → arg 1 (sqrt): "
        "expected aten.rsqrt.default, "
        "got aten.sqrt.default"
    )


def test_report_counts_misses_and_explain():
    gm = trace(lambda x, w: (hf_rms_norm(x, w) * 2, x.exp()), (4, 8), (8,))
    never = Rule("never", op(aten.cos.default, tensor()), lambda b, m: None)
    report = RuleSet("pass", [RMS_RULE, DOUBLE_RULE, never]).apply(gm, check=True)
    assert report.counts == {"hf_rms_norm": 1, "x*2 -> x+x": 1, "never": 0}
    assert set(report.misses) == {"never"}  # anchors inside a match are no near-misses
    assert report.explain() == (
        "pass: hf_rms_norm=1, x*2 -> x+x=1, never=0\n"
        "  near-miss never at -: expected an anchor node (aten.cos.default), "
        "got none in graph"
    )
    assert report.seconds > 0


def test_report_keeps_the_deepest_near_miss_per_rule():
    def fn(x, w):
        shallow = x * x  # fails three checks in at most
        return shallow, hf_rms_norm(x, w, eps=0.5)  # fails at the eps, fourteen checks in

    report = RuleSet("norms", [RMS_RULE]).apply(trace(fn, (4, 8), (8,)))
    assert str(report.misses["hf_rms_norm"]) == (
        "hf_rms_norm at mul_2: arg 1 (mul_1) → arg 1 (rsqrt) → arg 0 (add) → arg 1: "
        "expected scalar eps in (0.0, 0.01], got 0.5"
    )
    assert len(report.failures) == 3  # every MUL anchor that did not match


def test_logging_info_per_pass_and_debug_near_misses(caplog):
    caplog.set_level(logging.DEBUG, logger="fxsp")
    gm = trace(lambda x, w: hf_rms_norm(x, w, rsqrt=torch.sqrt) * 2, (4, 8), (8,))
    RuleSet("norms", [RMS_RULE, DOUBLE_RULE]).apply(gm)
    records = [(r.levelname, r.name, r.getMessage()) for r in caplog.records]
    level, logger, message = records[0]
    assert (level, logger) == ("INFO", "fxsp")
    assert re.fullmatch(r"norms: hf_rms_norm=0, x\*2 -> x\+x=1 \(\d+\.\d ms\)", message)
    assert records[1:] == [
        (
            "DEBUG",
            "fxsp",
            (
                "near-miss hf_rms_norm at mul_1: arg 1 (mul) → arg 1 (sqrt): "
                "expected aten.rsqrt.default, got aten.sqrt.default"
            ),
        ),
        ("DEBUG", "fxsp", "near-miss x*2 -> x+x at mul: arg 1 (sqrt): expected 2, got sqrt"),
    ]


def test_logging_at_info_hides_near_misses(caplog):
    caplog.set_level(logging.INFO, logger="fxsp")
    RuleSet("norms", [RMS_RULE]).apply(trace(lambda x: x.exp(), (3,)))
    assert [r.levelname for r in caplog.records] == ["INFO"]
