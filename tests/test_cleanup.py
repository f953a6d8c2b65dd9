"""Clean-up: no-ops judged on meta shapes, dead collectives removed, live ones kept."""

from __future__ import annotations

import pytest
import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import fxsp
from fxsp.cleanup import noop_rules, remove_dead_code

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


def clean(fn, *inputs, tracing_mode: str = "fake") -> tuple:
    gm = make_fx(fn, tracing_mode=tracing_mode)(*inputs)
    report = noop_rules().apply(gm, check=True)
    remove_dead_code(gm.graph)
    gm.recompile()
    return gm, report


def targets(gm) -> list:
    return [
        fxsp.dsl.pattern.target_name(n.target) for n in gm.graph.nodes if n.op == "call_function"
    ]


def test_identity_views_slices_and_slice_scatter_go():
    def f(x, y):
        a = aten.view.default(x, [4, 8])
        b = aten.slice.Tensor(a, 0, 0, 4)
        c = aten.slice_scatter.default(b, y, 0, 0, 4)
        return aten.reshape.default(c, [4, 8]) + 1

    gm, report = clean(f, torch.randn(4, 8), torch.randn(4, 8))
    assert targets(gm) == ["aten.add.Tensor"]
    assert report.counts["noop.slice_scatter"] == 1
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(gm(x, y), y + 1)  # the scatter wrote all of b: only y survives


def test_shape_changing_ops_stay():
    def f(x, y):
        a = aten.slice.Tensor(x, 0, 0, 3)
        b = aten.slice_scatter.default(x, y, 0, 0, 2)
        return aten.view.default(a, [24]), b

    gm, report = clean(f, torch.randn(4, 8), torch.randn(2, 8))
    assert targets(gm) == ["aten.slice.Tensor", "aten.slice_scatter.default", "aten.view.default"]
    assert "is not provably the same" in str(report.misses["noop.slice"])


def test_view_chain_folds_to_one_view_or_none():
    def f(x):
        return aten.view.default(aten.view.default(x, [32]), [2, 16]), aten.view.default(
            aten.view.default(x, [32]), [4, 8]
        )

    gm, report = clean(f, torch.randn(4, 8))
    assert report.counts["noop.view_chain"] == 2
    assert targets(gm) == ["aten.reshape.default"]


def _assert_reshapes_match_a_dispatch(graph) -> list:
    """Each reshape's value has the metadata a dispatch gives, and shares its input's storage
    exactly when the dispatch's does; returns the reshapes' values."""
    values = []
    for node in graph.find_nodes(op="call_function", target=aten.reshape.default):
        x, val = node.args[0].meta["val"], node.meta["val"]
        shape = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in node.args[1]]
        with detect_fake_mode([x]):
            want = aten.reshape.default(x, shape)
        assert (val.shape, val.stride(), val.storage_offset(), val.dtype) == (
            want.shape,
            want.stride(),
            want.storage_offset(),
            want.dtype,
        ), node.name
        storage = x.untyped_storage()._cdata
        shares = val.untyped_storage()._cdata == storage
        assert shares == (want.untyped_storage()._cdata == storage), node.name
        values.append(val)
    return values


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_folded_view_chain_takes_the_chain_value(tracing_mode):
    """Row-major views of one storage (size-1 dims, an offset, symbolic sizes): the one reshape
    is exactly the chain's view and takes its value, which is what a dispatch gives."""

    def f(x):
        rows = x.shape[0]
        size_one = aten.view.default(aten.view.default(x, [rows, 1, 8]), [1, rows * 8])
        offset = aten.slice.Tensor(x, 0, 1, rows)
        shifted = aten.view.default(aten.view.default(offset, [(rows - 1) * 8]), [rows - 1, 2, 4])
        return size_one, shifted

    gm = make_fx(f, tracing_mode=tracing_mode)(torch.randn(4, 8))
    chain_values = [
        n.meta["val"]
        for n in gm.graph.nodes
        if n.target is aten.view.default and n.args[0].target is aten.view.default
    ]
    report = noop_rules().apply(gm, check=True)
    remove_dead_code(gm.graph)
    gm.recompile()
    assert report.counts["noop.view_chain"] == 2
    values = _assert_reshapes_match_a_dispatch(gm.graph)
    assert len(values) == 2 and all(any(v is c for c in chain_values) for v in values)
    x = torch.randn(6 if tracing_mode == "symbolic" else 4, 8)
    for got, expected in zip(gm(x), f(x), strict=True):
        assert torch.equal(got, expected)


def test_folded_view_chain_through_a_copy_is_computed():
    """reshape of a transposed tensor copies: the chain's view is of the copy, not of x, so the
    one reshape gets a value of its own (a copy again), not the chain's."""
    mode = FakeTensorMode()
    with mode:
        transposed = torch.empty(4, 8).t()
        flat = aten.reshape.default(transposed, [32])
        chained = aten.view.default(flat, [4, 8])
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    inner = graph.call_function(aten.reshape.default, (x, [32]))
    root = graph.call_function(aten.view.default, (inner, [4, 8]))
    graph.output(root)
    for node, val in ((x, transposed), (inner, flat), (root, chained)):
        node.meta["val"] = val
    assert noop_rules().apply(graph, check=True).counts["noop.view_chain"] == 1
    remove_dead_code(graph)
    [value] = _assert_reshapes_match_a_dispatch(graph)
    assert value is not chained
    assert value.untyped_storage()._cdata != transposed.untyped_storage()._cdata


def test_symbolic_trim_is_not_a_noop():
    """rows padded to a multiple of 2 then trimmed back: equal only for even rows."""

    def f(x):
        rows = x.shape[0]
        padded = aten.constant_pad_nd.default(x, [0, 0, 0, (2 - rows % 2) % 2], 0.0)
        return aten.slice.Tensor(padded, 0, 0, rows)

    gm, _ = clean(f, torch.randn(6, 8), tracing_mode="symbolic")
    assert "aten.slice.Tensor" in targets(gm)
    assert gm(torch.randn(5, 8)).shape == (5, 8)


def test_dead_collectives_go_and_live_ones_stay(fake_pg):
    def f(x):
        dead = c10d.wait_tensor.default(c10d.all_gather_into_tensor.default(x, 2, "0"))  # noqa: F841
        live = c10d.wait_tensor.default(c10d.all_reduce.default(x, "sum", "0"))
        return live + 1

    gm = make_fx(f)(torch.randn(4, 8))
    before = targets(gm)
    assert "_c10d_functional.all_gather_into_tensor.default" in before
    graph = gm.graph
    graph.eliminate_dead_code()  # torch's own DCE keeps the dead wait (side-effecting)
    assert "_c10d_functional.all_gather_into_tensor.default" in targets(gm)
    assert remove_dead_code(graph)
    assert targets(gm) == [
        "_c10d_functional.all_reduce.default",
        "_c10d_functional.wait_tensor.default",
        "aten.add.Tensor",
    ]
