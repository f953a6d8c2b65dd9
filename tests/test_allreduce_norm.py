"""AllReduce + RMSNorm fusion (fxsp/sp/allreduce_norm.py, fxsp/ir/fused_ops.py,
fxsp/policy/fusion.py): when it may run, golden graphs of the rewrite on the fake process group,
the reference lowering, and on a real 2-rank gloo world raise → (SP →) fuse → lower equals eager.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable

import expecttest
import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph

import fxsp
from fxsp.cleanup import noop_rules, remove_dead_code
from fxsp.compile.options import decide_allreduce_rms_fusion
from fxsp.ir import lower_ir, raise_ir
from fxsp.ir.fused_ops import FUSED_IR_OPS
from fxsp.ir.kernels.flashinfer import FLASHINFER_ALLREDUCE, FLASHINFER_ALLREDUCE_PROVIDER
from fxsp.ir.providers import choose, providers
from fxsp.policy.fusion import FusionGate, allreduce_rms_fusion_gate
from fxsp.policy.thresholds import DeviceInfo
from fxsp.sp.allreduce_norm import AllReduceNormConfig, allreduce_norm_rules
from fxsp.sp.rules import SPConfig, sp_rules
from fxsp.testing.tp_llama import Spec, TPLlama
from tests.support import Block, capture
from tests.worlds import run_world

H100 = DeviceInfo("cuda", (9, 0), "NVIDIA H100")
B200 = DeviceInfo("cuda", (10, 0), "NVIDIA B200")

# ---------------------------------------------------------------------------------------------
# Gating: each failed condition named
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tp, pp, device, flashinfer, reason",
    [
        (2, 1, H100, True, None),
        (8, 1, B200, True, None),
        (4, 1, DeviceInfo("cuda", (10, 3), "NVIDIA B300"), True, None),
        (1, 1, H100, True, "tp_size=1: no all-reduce to fuse"),
        (2, 2, H100, True, "pipeline_parallel_size=2: the fused kernel deadlocks"),
        (
            2,
            1,
            DeviceInfo("cuda", (8, 0), "NVIDIA A100"),
            True,
            "device sm_80 (NVIDIA A100) is not SM90 or the SM100 family",
        ),
        (
            2,
            1,
            DeviceInfo("cuda", (12, 0), "RTX 5090"),
            True,
            "device sm_120 (RTX 5090) is not SM90",
        ),
        (
            2,
            1,
            DeviceInfo("rocm", (9, 0), "MI250"),
            True,
            "device rocm capability 9.0 (MI250) is not CUDA",
        ),
        (2, 1, DeviceInfo("cpu"), True, "device cpu is not CUDA"),
        (2, 1, H100, False, "FlashInfer is not importable"),
        # the first failed condition is the one named
        (1, 2, DeviceInfo("cpu"), False, "tp_size=1"),
        (2, 4, DeviceInfo("cpu"), False, "pipeline_parallel_size=4"),
    ],
)
def test_gate(tp, pp, device, flashinfer, reason):
    enabled, why = allreduce_rms_fusion_gate(tp, pp, device, flashinfer)
    assert enabled == (reason is None), why
    if reason is not None:
        assert why.startswith(reason), why


def test_gate_on_this_machine_logs_why_it_is_off(caplog):
    with caplog.at_level(logging.INFO, logger="fxsp"):
        gate = decide_allreduce_rms_fusion(2, 1, "cpu")
    assert gate == FusionGate(False, "device cpu is not CUDA (needs SM90 or SM100 family)")
    assert "AllReduce+RMSNorm fusion off: device cpu is not CUDA" in caplog.text
    with caplog.at_level(logging.INFO, logger="fxsp"):
        assert not decide_allreduce_rms_fusion(2, 2, H100).enabled  # no hardware looked at
    assert "pipeline_parallel_size=2" in caplog.text


# ---------------------------------------------------------------------------------------------
# Golden graphs on the fake process group
# ---------------------------------------------------------------------------------------------


def raised(model: torch.nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    gm = capture(model, *args)
    raise_ir(gm)
    remove_dead_code(gm.graph)
    return gm


def fused(gm: torch.fx.GraphModule, **config) -> fxsp.Report:
    cfg = AllReduceNormConfig(**{"group": dist.group.WORLD.group_name, "world": 2, **config})
    report = allreduce_norm_rules(cfg).apply(gm, check=True)
    remove_dead_code(gm.graph)
    gm.recompile()
    return report


def nonzero(report: fxsp.Report) -> dict:
    return {name: n for name, n in report.counts.items() if n}


class ResidualFirst(torch.nn.Module):
    """`residual + all_reduce(x @ w)`: the all-reduce is the add's second operand."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w, self.norm_w = (
            torch.nn.Parameter(torch.randn(8, 8)),
            torch.nn.Parameter(torch.randn(8)),
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple:
        h = residual + funcol.all_reduce(x @ self.w, "sum", dist.group.WORLD)
        return self.norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)), h


@pytest.fixture(autouse=False)
def world(fake_pg):
    return fake_pg


@pytest.mark.usefixtures("world")
class TestGoldenFusion(expecttest.TestCase):
    def test_first_and_fused_add_norms(self):
        gm = raised(Block(), torch.randn(4, 8))
        report = fused(gm, max_tokens=16)
        self.assertEqual(
            nonzero(report), {"allreduce_norm.rms_norm": 1, "allreduce_norm.fused_add_rms_norm": 2}
        )
        # The first all-reduce is also the residual: its readers take the fused op's [1].
        self.assertExpectedInline(
            fxsp.golden(gm),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8, 8]
%2 = input('arg2_1')  : f32[8]
%3 = input('arg3_1')  : f32[8, 8]
%4 = input('arg4_1')  : f32[8]
%5 = input('arg5_1')  : f32[8, 8]
%6 = input('arg6_1')  : f32[8]
%7 = aten.mm.default(%0, %1)  : f32[4, 8]
%8 = fxsp.allreduce_rms_norm.default(%7, %2, 1e-06, G0, 'c10d')  : (f32[4, 8], f32[4, 8])
%9 = operator.getitem(%8, 1)  : f32[4, 8]
%10 = operator.getitem(%8, 0)  : f32[4, 8]
%11 = aten.mm.default(%10, %3)  : f32[4, 8]
%12 = fxsp.allreduce_fused_add_rms_norm.default(%11, %9, %4, 1e-06, G0, 'c10d')  : (f32[4, 8], f32[4, 8])
%13 = operator.getitem(%12, 0)  : f32[4, 8]
%14 = operator.getitem(%12, 1)  : f32[4, 8]
%15 = aten.mm.default(%13, %5)  : f32[4, 8]
%16 = fxsp.allreduce_fused_add_rms_norm.default(%15, %14, %6, 1e-06, G0, 'c10d')  : (f32[4, 8], f32[4, 8])
%17 = operator.getitem(%16, 0)  : f32[4, 8]
return (%17,)""",
        )

    def test_fp8_forms_quantise_the_norm_only(self):
        gm = raised(Block(layers=1, fp8=True), torch.randn(4, 8))
        report = fused(gm, max_tokens=16)
        self.assertEqual(
            nonzero(report),
            {"allreduce_norm.rms_norm_fp8": 1, "allreduce_norm.fused_add_rms_norm": 1},
        )
        self.assertExpectedInline(
            fxsp.golden(gm),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8, 8]
%2 = input('arg2_1')  : f32[8]
%3 = input('arg3_1')  : f32[8, 8]
%4 = input('arg4_1')  : f32[8]
%5 = aten.mm.default(%0, %1)  : f32[4, 8]
%6 = aten.full.default([], 0.5, dtype=torch.float32)  : f32[]
%7 = fxsp.allreduce_rms_norm_static_fp8_quant.default(%5, %2, 1e-06, %6, torch.float8_e4m3fn, G0, 'c10d')  : (f8e4m3fn[4, 8], f32[4, 8])
%8 = operator.getitem(%7, 1)  : f32[4, 8]
%9 = operator.getitem(%7, 0)  : f8e4m3fn[4, 8]
%10 = prims.convert_element_type.default(%9, torch.float32)  : f32[4, 8]
%11 = aten.mul.Tensor(%10, %6)  : f32[4, 8]
%12 = aten.mm.default(%11, %3)  : f32[4, 8]
%13 = fxsp.allreduce_fused_add_rms_norm.default(%12, %8, %4, 1e-06, G0, 'c10d')  : (f32[4, 8], f32[4, 8])
%14 = operator.getitem(%13, 0)  : f32[4, 8]
return (%14,)""",
        )

    def test_all_reduce_as_second_operand(self):
        gm = raised(ResidualFirst(), torch.randn(4, 8), torch.randn(4, 8))
        self.assertIn("fxsp.fused_add_rms_norm.default(%1, %5, %3, 1e-05)", fxsp.golden(gm))
        report = fused(gm, max_tokens=16)
        self.assertEqual(nonzero(report), {"allreduce_norm.fused_add_rms_norm": 1})
        self.assertExpectedInline(
            fxsp.golden(gm),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[4, 8]
%2 = input('arg2_1')  : f32[8, 8]
%3 = input('arg3_1')  : f32[8]
%4 = aten.mm.default(%0, %2)  : f32[4, 8]
%5 = fxsp.allreduce_fused_add_rms_norm.default(%4, %1, %3, 1e-05, G0, 'c10d')  : (f32[4, 8], f32[4, 8])
%6 = operator.getitem(%5, 0)  : f32[4, 8]
%7 = operator.getitem(%5, 1)  : f32[4, 8]
return (%6, %7)""",
        )

    def test_lowered_with_the_reference(self):
        gm = raised(Block(layers=0), torch.randn(4, 8))
        fused(gm, max_tokens=16)
        self.assertEqual(lower_ir(gm), {"aten": 1})
        gm.graph.lint()
        self.assertExpectedInline(
            fxsp.golden(gm),
            """\
%0 = input('arg0_1')  : f32[4, 8]
%1 = input('arg1_1')  : f32[8, 8]
%2 = input('arg2_1')  : f32[8]
%3 = aten.mm.default(%0, %1)  : f32[4, 8]
%4 = _c10d_functional.all_reduce.default(%3, 'sum', G0)  : f32[4, 8]
%5 = _c10d_functional.wait_tensor.default(%4)  : f32[4, 8]
%6 = aten.pow.Tensor_Scalar(%5, 2)  : f32[4, 8]
%7 = aten.mean.dim(%6, [-1], True)  : f32[4, 1]
%8 = aten.add.Tensor(%7, 1e-06)  : f32[4, 1]
%9 = aten.rsqrt.default(%8)  : f32[4, 1]
%10 = aten.mul.Tensor(%5, %9)  : f32[4, 8]
%11 = aten.mul.Tensor(%10, %2)  : f32[4, 8]
return (%11,)""",
        )


def test_rows_above_the_limit_are_left_alone(world):
    gm = raised(Block(layers=1), torch.randn(4, 8))
    before = fxsp.golden(gm)
    report = fused(gm, max_tokens=3)
    assert nonzero(report) == {}
    assert "4 rows > fusion limit 3" in str(report.misses["allreduce_norm.rms_norm"])
    assert fxsp.golden(gm) == before


def test_auto_limit_has_no_number_on_cpu(world):
    report = fused(raised(Block(layers=1), torch.randn(4, 8)))  # max_tokens="auto"
    assert nonzero(report) == {}
    assert "no AllReduce+RMSNorm fusion size for cpu" in str(
        report.misses["allreduce_norm.rms_norm"]
    )


def test_other_groups_are_never_fused(world):
    report = fused(raised(Block(layers=1), torch.randn(4, 8)), group="tp-group", max_tokens=16)
    assert nonzero(report) == {}
    assert "not the TP group" in str(report.misses["allreduce_norm.fused_add_rms_norm"])


def test_symbolic_rows_only_when_provably_small(world):
    x = torch.randn(4, 8)
    torch._dynamo.mark_dynamic(x, 0)
    report = fused(raised(Block(layers=1), x), max_tokens=16)
    assert nonzero(report) == {}
    assert "symbolic rows may exceed the fusion limit 16" in str(
        report.misses["allreduce_norm.rms_norm"]
    )
    x = torch.randn(4, 8)
    torch._dynamo.mark_dynamic(x, 0, min=2, max=16)
    assert nonzero(fused(raised(Block(layers=1), x), max_tokens=16)) == {
        "allreduce_norm.rms_norm": 1,
        "allreduce_norm.fused_add_rms_norm": 1,
    }


@pytest.mark.parametrize("rows, rule_set", [(4, "allreduce_norm"), (8, "sp")])
def test_sp_takes_large_batches_fusion_the_rest(world, rows, rule_set):
    """In fxsp's order of passes: SP from 8 rows on, then the fusion below."""
    gm = raised(Block(layers=1), torch.randn(rows, 8))
    sp = sp_rules(SPConfig(group=dist.group.WORLD.group_name, world=2, rank=0, min_tokens=8))
    counts = {**nonzero(sp.apply(gm)), **nonzero(fused(gm, max_tokens=7))}
    assert {name.split(".")[0] for name in counts} == {rule_set}, counts
    assert sum(counts.values()) == 2


def test_fused_ops_lower_to_the_reference_on_cpu():
    for op in FUSED_IR_OPS:
        assert choose(op, "cpu", torch.bfloat16) is None
        assert FLASHINFER_ALLREDUCE_PROVIDER.impls[op]._schema.arguments[-2].name == "group_name"
    assert FLASHINFER_ALLREDUCE_PROVIDER.devices == {"cuda"}
    registered = FLASHINFER_ALLREDUCE in [p.name for p in providers()]
    assert registered == (importlib.util.find_spec("flashinfer") is not None)


def test_flashinfer_wrappers_compute_the_reference_where_the_kernel_cannot_run(world_of_one):
    x, residual = torch.randn(3, 16).bfloat16(), torch.randn(3, 16).bfloat16()
    given = {
        "x": x,
        "residual": residual,
        "weight": torch.randn(16).bfloat16(),
        "eps": 1e-6,
        "scale": torch.tensor(0.05),
        "fp8_dtype": torch.float8_e4m3fn,
        "group_name": world_of_one.group_name,
        "flavor": "c10d",
    }
    for op in FUSED_IR_OPS:
        args = [given[a.name] for a in op._schema.arguments]
        wrapper = FLASHINFER_ALLREDUCE_PROVIDER.impls[op]
        got, want = wrapper(*args), op(*args)  # on CPU: the reference
        assert all(
            torch.equal(g.float(), w.float()) and g.dtype == w.dtype
            for g, w in zip(got, want, strict=True)
        ), op
        with FakeTensorMode() as mode:
            fakes = wrapper(
                *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            )
        assert [(f.shape, f.dtype) for f in fakes] == [(w.shape, w.dtype) for w in want], op


# ---------------------------------------------------------------------------------------------
# Numerics on a real 2-rank gloo world, reference provider
# ---------------------------------------------------------------------------------------------


def passes_with_fusion(graph: Graph, fusion: AllReduceNormConfig, sp: SPConfig | None) -> dict:
    """fxsp's passes with the fusion after SP, as the backend is to run it."""
    raise_ir(graph)
    counts = nonzero(sp_rules(sp).apply(graph)) if sp is not None else {}
    counts.update(nonzero(allreduce_norm_rules(fusion).apply(graph)))
    remove_dead_code(graph)
    noop_rules().apply(graph)
    lower_ir(graph)
    remove_dead_code(graph)
    graph.lint()
    assert not [n for n in graph.nodes if n.target in FUSED_IR_OPS]
    return counts


def compile_with(passes: Callable[[Graph], dict], reports: list) -> Callable:
    """A torch.compile backend like `fxsp.backend(inner="eager")` running `passes` instead of
    fxsp's passes: AOT autograd with Inductor's decompositions, no codegen."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def forward(gm: torch.fx.GraphModule, inputs: list):
        reports.append(passes(gm.graph))
        gm.recompile()
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=forward, decompositions=select_decomp_table())


def fuse_and_compare(rank: int, world: int, cases: list) -> tuple[list, dict]:
    """For each (spec, rows, max fused rows, SP min rows or None): max |compiled - eager| and the
    rule counts. Then the fused ops called eagerly against the unfused chain."""
    group = dist.group.WORLD.group_name
    out = []
    for spec, rows, max_tokens, sp_min in cases:
        torch._dynamo.reset()
        model, reports = TPLlama(spec), []
        fusion = AllReduceNormConfig(group, world, max_tokens=max_tokens)
        sp = None if sp_min is None else SPConfig(group, world, rank, min_tokens=sp_min)
        passes = functools.partial(passes_with_fusion, fusion=fusion, sp=sp)
        compiled = torch.compile(model, backend=compile_with(passes, reports))
        inputs = model.example_input(rows)
        with torch.no_grad():
            reference, result = model(inputs), compiled(inputs)
        out.append((spec, rows, (result.float() - reference.float()).abs().max().item(), reports))

    g = torch.Generator().manual_seed(rank)  # each rank its own partial sums
    x, residual = torch.randn(5, 16, generator=g), torch.randn(5, 16)
    w, scale = torch.randn(16), torch.tensor(0.05)
    reduced = funcol.all_reduce(x, "sum", dist.group.WORLD)
    fp8 = torch.float8_e4m3fn
    fxsp_ops = torch.ops.fxsp
    eager = {
        "allreduce_rms_norm": torch.ops.fxsp.allreduce_rms_norm(x, w, 1e-6, group, "c10d"),
        "allreduce_fused_add_rms_norm": torch.ops.fxsp.allreduce_fused_add_rms_norm(
            x, residual, w, 1e-6, group, "c10d"
        ),
        "allreduce_fused_add_rms_norm_static_fp8_quant": (
            fxsp_ops.allreduce_fused_add_rms_norm_static_fp8_quant(
                x, residual, None, 1e-6, scale, fp8, group, "c10d"
            )
        ),
    }
    unfused = {
        "allreduce_rms_norm": (torch.ops.fxsp.rms_norm(reduced, w, 1e-6), reduced),
        "allreduce_fused_add_rms_norm": torch.ops.fxsp.fused_add_rms_norm(
            reduced, residual, w, 1e-6
        ),
        "allreduce_fused_add_rms_norm_static_fp8_quant": (
            torch.ops.fxsp.static_fp8_quant(
                torch.ops.fxsp.fused_add_rms_norm(reduced, residual, None, 1e-6)[0], scale, fp8
            ),
            reduced + residual,
        ),
    }
    same = {
        name: all(
            torch.equal(a.float(), b.float())
            for a, b in zip(eager[name], unfused[name], strict=True)
        )
        for name in eager
    }
    return out, same


class FakeFlashInferComm:
    """Stands in for `flashinfer.comm` on CPU: its two entry points, computed with c10d and the
    references, so the provider's plumbing (workspace group, pattern codes, output buffers) runs
    without a GPU. Records the group of each workspace."""

    class AllReduceFusionPattern:
        kARResidualRMSNorm = 1
        kARResidualRMSNormFP8Quant = 3

    def __init__(self) -> None:
        self.workspace_groups: list[str] = []

    def trtllm_create_ipc_workspace_for_all_reduce_fusion(
        self, tp_rank, tp_size, max_token_num, hidden_dim, group=None
    ):
        assert (dist.get_rank(group), dist.get_world_size(group)) == (tp_rank, tp_size)
        self.workspace_groups.append(group.group_name)
        return [], {"group": group}

    def trtllm_allreduce_fusion(
        self,
        *,
        allreduce_in,
        workspace_ptrs,
        pattern_code,
        residual_in,
        residual_out,
        norm_out,
        quant_out,
        rms_gamma,
        rms_eps,
        scale_factor,
        **launch,
    ):
        reduced = allreduce_in.clone()
        dist.all_reduce(reduced, group=workspace_ptrs["group"])
        residual_out.copy_(reduced + residual_in)
        normed = torch.ops.fxsp.rms_norm(residual_out, rms_gamma, rms_eps)
        if pattern_code == self.AllReduceFusionPattern.kARResidualRMSNormFP8Quant:
            quant_out.copy_(torch.ops.fxsp.static_fp8_quant(normed, scale_factor, quant_out.dtype))
        else:
            norm_out.copy_(normed)


def flashinfer_plumbing(rank: int) -> tuple[list, list, str]:
    """The FlashInfer provider's kernel path against the references, on a TP group that is not
    the world group; with a stand-in for `flashinfer.comm`."""
    from fxsp.ir import fused_ops
    from fxsp.ir.kernels import flashinfer as flashinfer_provider

    tp_group = dist.new_group([0, 1])
    name = tp_group.group_name
    comm = FakeFlashInferComm()
    flashinfer_provider._flashinfer = lambda part: comm
    g = torch.Generator().manual_seed(rank)
    x, residual = torch.randn(2, 3, 16, generator=g).bfloat16(), torch.randn(2, 3, 16).bfloat16()
    w, scale, fp8 = torch.randn(16).bfloat16(), torch.tensor(0.05), torch.float8_e4m3fn
    calls = [
        (
            (x, None, w, 1e-6, name),
            fused_ops.allreduce_rms_norm_reference(x, w, 1e-6, name, "c10d"),
        ),
        (
            (x, residual, None, 1e-5, name),
            fused_ops.allreduce_fused_add_rms_norm_reference(x, residual, None, 1e-5, name, "c10d"),
        ),
        (
            (x, residual, w, 1e-6, name, scale, fp8),
            fused_ops.allreduce_fused_add_rms_norm_static_fp8_quant_reference(
                x, residual, w, 1e-6, scale, fp8, name, "c10d"
            ),
        ),
    ]
    same = [
        all(
            torch.equal(a.float(), b.float())
            for a, b in zip(flashinfer_provider._fused_kernel(*args), want, strict=True)
        )
        for args, want in calls
    ]
    too_many_rows = torch.zeros(
        flashinfer_provider.DEFAULT_WORKSPACE_TOKENS + 1, 16, dtype=torch.bfloat16
    )
    same.append(flashinfer_provider._fused_kernel(too_many_rows, None, None, 1e-6, name) is None)
    return same, comm.workspace_groups, name


def two_rank_checks(rank: int, world: int, cases: list) -> tuple:
    return fuse_and_compare(rank, world, cases), flashinfer_plumbing(rank)


BASE = Spec(layers=1)


def test_fused_equals_eager_on_two_ranks():
    cases = [
        (BASE.with_(fp8=True), 5, 64, None),
        (BASE.with_(dtype=torch.bfloat16, norm="torch", eps=1e-5, batched=True), 6, 64, None),
        # fxsp's order of passes: SP from 8 rows on, the fusion below
        (BASE, 5, 7, 8),
        (BASE, 9, 7, 8),
    ]
    sites = 2 * BASE.layers + 1  # every norm follows an all-reduce
    for rank, ((results, same), plumbing) in enumerate(run_world(2, two_rank_checks, cases)):
        assert all(same.values()), (rank, same)
        kernel_same, workspace_groups, tp_group = plumbing
        assert all(kernel_same), (rank, kernel_same)
        # one workspace, reused, on the TP group (never the world group)
        assert workspace_groups == [tp_group] and tp_group != "0", workspace_groups
        for spec, rows, error, reports in results:
            where = f"rank {rank}, rows {rows}, {spec}"
            assert error <= (6e-2 if spec.dtype == torch.bfloat16 else 1e-5), f"{error} at {where}"
            (counts,) = reports
            rule_set = "sp" if rows >= 8 else "allreduce_norm"  # SP only in the cases with 9 rows
            assert sum(counts.values()) == sites, f"{counts} at {where}"
            assert {name.split(".")[0] for name in counts} == {rule_set}, f"{counts} at {where}"
            if spec.fp8:
                assert counts == {
                    "allreduce_norm.rms_norm_fp8": 1,
                    "allreduce_norm.fused_add_rms_norm_fp8": sites - 2,
                    "allreduce_norm.fused_add_rms_norm": 1,
                }, counts
