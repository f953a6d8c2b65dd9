"""fake_value's direct construction of collective results agrees with a fake-mode dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import Graph
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from fxsp.fake import _FRESH_RESULTS, fake_value

c10d = torch.ops._c10d_functional


def _inputs(symbolic: bool) -> tuple[FakeTensorMode, dict]:
    mode = FakeTensorMode(shape_env=ShapeEnv())
    context = (StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
               if symbolic else None)
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
    for target in _FRESH_RESULTS:
        for name, x in inputs.items():
            node = graph.placeholder(name)
            node.meta["val"] = x
            args = _args(target, x, world, group)
            direct = fake_value(target, (node, *args[1:]), {})
            with mode:
                dispatched = target(*args)
            where = f"{target} on {name} ({'symbolic' if symbolic else 'static'})"
            assert isinstance(direct, FakeTensor) and direct.fake_mode is mode, where
            assert (direct.shape, direct.stride(), direct.dtype, direct.device) == (
                dispatched.shape, dispatched.stride(), dispatched.dtype, dispatched.device), where
