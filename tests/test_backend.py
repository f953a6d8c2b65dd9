"""The backend's surface, single process on the fake process group: options, groups, TP 1,
reports, cache keys and the run-time dispatch between SP and non-SP variants."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.distributed as dist

import fxsp
from fxsp.compile.backend import FxspPass
from fxsp.compile.report import GraphReport
from fxsp.runtime.guard import RankGuard
from fxsp.runtime.row_dispatch import RowDispatch
from tests.support import Block


def compile_block(x: torch.Tensor, **options) -> tuple:
    backend = fxsp.backend(None, inner="eager", **options)
    with torch.no_grad():
        out = torch.compile(Block(layers=1), backend=backend)(x)
    return backend, out


def test_bad_options_and_groups_are_clear_errors_at_construction():
    """No process group needed: a bad group or option fails in fxsp.backend(...), saying what is
    allowed, not later inside Dynamo's BackendCompilerFailed."""
    for group in (3, object(), "tp"):
        with pytest.raises(
            TypeError, match="tp_group must be a ProcessGroup, a 1-D DeviceMesh or None"
        ):
            fxsp.backend(group)
    with pytest.raises(ValueError, match="min_tokens must be 'auto' or an int >= 0, not -5"):
        fxsp.backend(None, min_tokens=-5)
    with pytest.raises(ValueError, match="min_tokens must be 'auto' or an int >= 0, not 'many'"):
        fxsp.backend(None, min_tokens="many")
    for bad in (1.5, True, None):
        with pytest.raises(TypeError, match="min_tokens must be 'auto' or an int >= 0"):
            fxsp.backend(None, min_tokens=bad)
    with pytest.raises(TypeError, match="fp8 must be True or False, not 'yes'"):
        fxsp.backend(None, fp8="yes")
    with pytest.raises(TypeError, match="check_ranks must be True or False, not 1"):
        fxsp.backend(None, check_ranks=1)
    with pytest.raises(ValueError, match="inner must be 'inductor' or 'eager', not 'tvm'"):
        fxsp.backend(None, inner="tvm")
    with pytest.raises(ValueError, match="pipeline_size must be an int >= 1, not 0"):
        fxsp.backend(None, pipeline_size=0)
    with pytest.raises(
        TypeError,
        match=r"unexpected keyword arguments \['min_token'\]; its options are min_tokens, fp8",
    ):
        fxsp.backend(None, min_token=3)
    with pytest.raises(TypeError, match="min_tokens must be"):
        fxsp.Options(min_tokens=2.0)  # the dataclass checks itself too
    assert fxsp.backend(None, min_tokens=0, fp8=False).options.min_tokens == 0


def test_vllm_pass_checks_its_options_at_construction():
    from fxsp import Options
    from fxsp.adapters.vllm import _FxspVllmPassImpl  # FxspVllmPass's constructor, without vLLM

    with pytest.raises(ValueError, match="min_tokens must be 'auto' or an int >= 0, not -5"):
        _FxspVllmPassImpl(min_tokens=-5)
    with pytest.raises(TypeError, match="explain must be True or False, not 'no'"):
        _FxspVllmPassImpl(explain="no")
    with pytest.raises(ValueError, match="hidden_size must be None or an int > 0, not 0"):
        _FxspVllmPassImpl(hidden_size=0)
    with pytest.raises(TypeError, match="dtype must be None or a torch.dtype, not 'bf16'"):
        _FxspVllmPassImpl(dtype="bf16")
    with pytest.raises(TypeError, match="fp8 must be True or False"):
        Options(fp8=None)
    assert (
        _FxspVllmPassImpl(min_tokens=8, hidden_size=64, dtype=torch.bfloat16).options.min_tokens
        == 8
    )


def test_two_dimensional_mesh_is_refused(fake_pg):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, fake_pg), mesh_dim_names=("dp", "tp"))
    with pytest.raises(ValueError, match="1-D DeviceMesh, got 2-D"):
        fxsp.backend(mesh)
    assert fxsp.backend(mesh["tp"]).sp_config().world == fake_pg


def test_device_mesh_and_process_group_name_the_same_group(fake_pg):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (fake_pg,))
    by_mesh, by_group = fxsp.backend(mesh).sp_config(), fxsp.backend(dist.group.WORLD).sp_config()
    assert by_mesh == by_group and by_mesh.world == fake_pg


@pytest.mark.parametrize("fake_pg", [1], indirect=True)
def test_tp_size_one_rewrites_nothing_and_says_so_once(fake_pg, caplog):
    backend = fxsp.backend(None, inner="eager")
    with caplog.at_level(logging.INFO, logger="fxsp"), torch.no_grad():
        compiled = torch.compile(Block(layers=1), backend=backend)
        compiled(torch.randn(4, 8))
        compiled(torch.randn(6, 8))  # a recompile: still one message
    assert [r.message for r in caplog.records].count(
        "fxsp: TP size 1, sequence parallelism has nothing to do"
    ) == 1
    assert all(
        not k.startswith("sp.") or v == 0 for r in backend.reports for k, v in r.counts.items()
    )


def test_report_surface(fake_pg):
    backend, _ = compile_block(torch.randn(4, 8))
    (report,) = backend.reports
    assert report.counts["sp.first"] == 1 and report.counts["sp.last"] == 1
    assert "fxsp.all_reduce" not in report.after and "reduce_scatter_tensor" in report.after
    assert "all_reduce.default" in report.before
    assert "sp: sp.first_fp8=0" in report.explain()
    assert report.traffic_before.bytes == {"all_reduce": 2 * 4 * 8 * 4}
    assert report.traffic_after.norm_rows == [2, 2]  # 4 rows over 2 ranks, both norms


def test_report_round_trips_through_json(fake_pg):
    """What the reports cache saves is plain JSON and reads back as the same report."""
    x = torch.randn(6, 8)
    torch._dynamo.mark_dynamic(x, 0)
    backend, _ = compile_block(x, min_tokens=0)
    (report,) = backend.reports
    text = json.dumps(report.to_json())
    back = GraphReport.from_json(json.loads(text))
    assert back.cached and not report.cached
    assert back.to_json() == report.to_json()
    assert back.counts == report.counts and back.collectives == report.collectives
    assert back.explain() == report.explain() and back.after == report.after
    assert {k: str(v) for k, v in back.misses.items()} == {
        k: str(v) for k, v in report.misses.items()
    }
    assert back.traffic_after == report.traffic_after
    assert back.traffic_after.per_layer(fake_pg) == report.traffic_after.per_layer(fake_pg)

    backend = fxsp.backend(None, inner="eager", min_tokens=8)  # symbolic row thresholds: as text
    with torch.no_grad():
        torch.compile(Block(layers=1), backend=backend)(x)
    with_sp = backend.reports[0]
    assert with_sp.row_thresholds
    back = GraphReport.from_json(json.loads(json.dumps(with_sp.to_json())))
    assert back.row_thresholds == [(str(rows), need) for rows, need in with_sp.row_thresholds]


def test_explain_option_logs_near_misses(fake_pg, caplog):
    with caplog.at_level(logging.INFO, logger="fxsp"):
        compile_block(torch.randn(4, 8), explain=True, min_tokens=64)
    assert any(
        "near-miss sp.first at" in r.message and "4 rows < min_tokens 64" in r.message
        for r in caplog.records
    )


def test_cache_key_covers_rank_options_and_group(fake_pg):
    backend = fxsp.backend(None)
    sp = backend.sp_config()
    key = FxspPass(backend, sp).uuid()
    assert key == FxspPass(fxsp.backend(None), sp).uuid()  # deterministic
    assert key != FxspPass(backend, sp.__class__(**{**sp.__dict__, "rank": 1})).uuid()
    assert key != FxspPass(fxsp.backend(None, fp8=False), sp).uuid()
    assert key != FxspPass(backend, None).uuid()


def test_symbolic_rows_dispatch_by_threshold(fake_pg):
    x = torch.randn(6, 8)
    torch._dynamo.mark_dynamic(x, 0)
    backend = fxsp.backend(None, inner="eager", min_tokens=8)
    captured = []

    def spy(gm, inputs):
        fn = backend(gm, inputs)
        captured.append(fn)
        return fn

    with torch.no_grad():
        torch.compile(Block(layers=1), backend=spy)(x)
    (guarded,) = captured
    assert isinstance(guarded, RankGuard)
    dispatch = guarded.fn
    assert isinstance(dispatch, RowDispatch)
    with_sp, without_sp = backend.reports
    assert with_sp.counts["sp.first"] == 1 and without_sp.counts.get("sp.first", 0) == 0
    (symbol,) = dispatch.sources
    index, dim = dispatch.sources[symbol]
    args = [None] * (index + 1)
    for rows, expected in [(7, False), (8, True), (100, True)]:
        args[index] = torch.empty(rows, 8) if dim is not None else rows
        assert dispatch.use_sp(tuple(args)) is expected, rows


def test_symbolic_rows_without_threshold_compile_once(fake_pg):
    x = torch.randn(6, 8)
    torch._dynamo.mark_dynamic(x, 0)
    backend, _ = compile_block(x, min_tokens=0)
    (report,) = backend.reports
    assert report.counts["sp.first"] == 1


def test_batch_invariant_turns_sp_and_fusion_off(fake_pg, caplog):
    with caplog.at_level(logging.INFO, logger="fxsp"):
        backend, _ = compile_block(torch.randn(4, 8), batch_invariant=True)
    assert all(
        v == 0
        for r in backend.reports
        for k, v in r.counts.items()
        if k.startswith(("sp.", "allreduce_norm."))
    )
    assert backend.fusion_config() is None
    assert any("batch_invariant: sequence parallelism is off" in r.message for r in caplog.records)


def test_fusion_is_off_on_cpu_and_says_why(fake_pg, caplog):
    with caplog.at_level(logging.INFO, logger="fxsp"):
        assert fxsp.backend(None).fusion_config() is None
    assert any("CUDA" in r.message or "cuda" in r.message for r in caplog.records), [
        r.message for r in caplog.records
    ]


def test_floats_traced_as_inputs_are_named_with_the_fix(fake_pg, caplog):
    """dynamic=True makes each norm's eps a graph input, which no rule can match: the backend
    says so once, naming the floats and the fix; the fix it names makes the rewrite happen."""
    from fxsp.testing.tp_llama import Spec, TPLlama

    model = TPLlama(Spec(layers=1))

    def sp_matches(backend) -> int:
        return sum(v for r in backend.reports for k, v in r.counts.items() if k.startswith("sp."))

    backend = fxsp.backend(None, inner="eager")
    with caplog.at_level(logging.WARNING, logger="fxsp"), torch.no_grad():
        compiled = torch.compile(model, backend=backend, dynamic=True)
        compiled(model.example_input(8))
        compiled(model.example_input(8))
    named = [r.message for r in caplog.records if "traced Python floats" in r.message]
    assert len(named) == 1 and "specialize_float" in named[0], named
    assert named[0].count(".eps") == 3, named  # two layer norms and the final norm
    assert sp_matches(backend) == 0

    torch._dynamo.reset()
    caplog.clear()
    backend = fxsp.backend(None, inner="eager")
    with (
        caplog.at_level(logging.WARNING, logger="fxsp"),
        torch.no_grad(),
        torch._dynamo.config.patch(specialize_float=True),
    ):
        torch.compile(model, backend=backend, dynamic=True)(model.example_input(8))
    assert not [r for r in caplog.records if "traced Python floats" in r.message]
    assert sp_matches(backend) == 3  # first, middle, last
