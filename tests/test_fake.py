"""fake_value's direct constructions (collective results, results repeated from an earlier node)
agree with a fake-mode dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import fxsp.ir.ops  # noqa: F401 - defines torch.ops.fxsp
from fxsp.dsl.fake import FRESH_RESULTS, fake_value

c10d = torch.ops._c10d_functional


def _inputs(symbolic: bool) -> tuple[FakeTensorMode, dict]:
    mode = FakeTensorMode(shape_env=ShapeEnv())
    context = (
        StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
        if symbolic
        else None
    )
    base = mode.from_tensor(torch.empty(12, 8), symbolic_context=context)
    with mode:
        wide = torch.empty(12, 16, dtype=torch.bfloat16)
    return mode, {
        "contiguous": base,
        "bf16": wide,
        "transposed": base.t(),  # not contiguous: wait_tensor (an empty_like) is dispatched
        "every_other_row": base[::2],  # not dense: the dispatch decides
    }


def _args(target, x, world: int, group: str) -> tuple:
    if target is c10d.wait_tensor.default:
        return (x,)
    if target is c10d.all_gather_into_tensor.default:
        return (x, world, group)
    return (x, "sum", world, group)


@pytest.mark.parametrize("fake_pg", [2, 3], indirect=True)
@pytest.mark.parametrize("symbolic", [False, True])
def test_direct_results_match_the_dispatch(fake_pg, symbolic):
    world, group = fake_pg, dist.group.WORLD.group_name
    mode, inputs = _inputs(symbolic)
    graph = Graph()
    # fxsp/ir/collectives.py registers its ops' direct results.
    assert {
        c10d.wait_tensor.default,
        c10d.all_gather_into_tensor.default,
        c10d.reduce_scatter_tensor.default,
    } <= set(FRESH_RESULTS)
    for target in FRESH_RESULTS:
        for name, x in inputs.items():
            node = graph.placeholder(name)
            node.meta["val"] = x
            args = _args(target, x, world, group)
            direct = fake_value(target, (node, *args[1:]), {})
            with mode:
                dispatched = target(*args)
            where = f"{target} on {name} ({'symbolic' if symbolic else 'static'})"
            assert isinstance(direct, FakeTensor) and direct.fake_mode is mode, where
            assert _same_metadata(direct, dispatched), where


def _placeholder(graph: Graph, name: str, val: torch.Tensor):
    node = graph.placeholder(name)
    node.meta["val"] = val
    return node


def _same_metadata(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape, a.stride(), a.storage_offset(), a.dtype, a.device) == (
        b.shape,
        b.stride(),
        b.storage_offset(),
        b.dtype,
        b.device,
    )


@pytest.mark.parametrize("symbolic", [False, True])
def test_repeated_results_are_fresh_tensors_like_the_dispatch(symbolic):
    """The second node with the same target and inputs' metadata gets a result built from the
    first one's: equal to a dispatch, but a tensor (and storage) of its own."""
    mode, inputs = _inputs(symbolic)
    with mode:
        weight = torch.empty(16, dtype=torch.bfloat16)
    graph = Graph()
    x, wide = (
        _placeholder(graph, "x", inputs["contiguous"]),
        _placeholder(graph, "wide", inputs["bf16"]),
    )
    w = _placeholder(graph, "w", weight)
    cases = [
        (torch.ops.aten.mul.Tensor, (x, x)),
        (torch.ops.aten.sum.dim_IntList, (x, [1], True)),
        (torch.ops.prims.convert_element_type.default, (wide, torch.float32)),
        (torch.ops.fxsp.fused_add_rms_norm.default, (wide, wide, w, 1e-6)),
    ]  # a tuple
    for target, args in cases:
        first, second = fake_value(target, args, {}), fake_value(target, args, {})
        with mode:
            dispatched = target(*[a.meta["val"] if isinstance(a, Node) else a for a in args])
        results = [r if isinstance(r, tuple) else (r,) for r in (first, second, dispatched)]
        for one, two, want in zip(*results, strict=True):
            assert isinstance(two, FakeTensor) and two.fake_mode is mode, target
            assert _same_metadata(two, want) and _same_metadata(one, want), target
            assert (
                two is not one and two.untyped_storage()._cdata != one.untyped_storage()._cdata
            ), target


def test_views_are_dispatched_every_time():
    """A view shares its input's storage: never built from an earlier result."""
    mode, inputs = _inputs(False)
    graph = Graph()
    x = _placeholder(graph, "x", inputs["contiguous"])
    for _ in range(2):
        view = fake_value(torch.ops.aten.view.default, (x, [8, 12]), {})
        assert view.untyped_storage()._cdata == inputs["contiguous"].untyped_storage()._cdata
        assert tuple(view.shape) == (8, 12)


def test_lowering_stamps_one_trace_with_values_of_their_own():
    """Norms alike in metadata are lowered from one traced template; every inlined node still
    has a fake tensor of its own, like the template's."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxsp.ir.lowering import lower_ir

    ir = torch.ops.fxsp

    def two_norms(x, y, w):
        return ir.rms_norm(x, w, 1e-6) + ir.rms_norm(y, w, 1e-6)

    gm = make_fx(two_norms, tracing_mode="fake")(
        torch.randn(4, 8), torch.randn(4, 8), torch.randn(8)
    )
    lower_ir(gm)
    inlined = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is not torch.ops.aten.add.Tensor
    ]
    assert len(inlined) % 2 == 0 and inlined, gm.graph
    half = len(inlined) // 2
    for one, two in zip(inlined[:half], inlined[half:], strict=True):
        assert one.target is two.target
        a, b = one.meta["val"], two.meta["val"]
        assert _same_metadata(a, b) and a is not b
        assert a.untyped_storage()._cdata != b.untyped_storage()._cdata
    x, y, w = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8)
    torch.testing.assert_close(gm(x, y, w), two_norms(x, y, w))
