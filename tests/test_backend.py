"""The backend's surface, single process on the fake process group: options, groups, TP 1,
reports, cache keys and the run-time dispatch between SP and non-SP variants."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist

import fxsp
from fxsp.backend import FxspPass, RowDispatch
from fxsp.runtime.guard import RankGuard
from tests.test_sp_graphs import Block


def compile_block(x: torch.Tensor, **options) -> tuple:
    backend = fxsp.backend(None, inner="eager", **options)
    with torch.no_grad():
        out = torch.compile(Block(layers=1), backend=backend)(x)
    return backend, out


def test_bad_options_and_groups_are_clear_errors(fake_pg):
    with pytest.raises(ValueError, match="inner must be"):
        fxsp.backend(None, inner="tvm")
    with pytest.raises(TypeError, match="unexpected keyword"):
        fxsp.backend(None, min_token=3)
    with pytest.raises(TypeError, match="ProcessGroup, a 1-D DeviceMesh or None"):
        fxsp.backend("tp").sp_config()


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
    assert [r.message for r in caplog.records].count("fxsp: TP size 1, sequence parallelism has nothing to do") == 1
    assert all(not k.startswith("sp.") or v == 0 for r in backend.reports for k, v in r.counts.items())


def test_report_surface(fake_pg):
    backend, _ = compile_block(torch.randn(4, 8))
    (report,) = backend.reports
    assert report.counts["sp.first"] == 1 and report.counts["sp.last"] == 1
    assert "fxsp.all_reduce" not in report.after and "reduce_scatter_tensor" in report.after
    assert "all_reduce.default" in report.before
    assert "sp: sp.first_fp8=0" in report.explain()
    assert report.traffic_before.bytes == {"all_reduce": 2 * 4 * 8 * 4}
    assert report.traffic_after.norm_rows == [2, 2]  # 4 rows over 2 ranks, both norms


def test_explain_option_logs_near_misses(fake_pg, caplog):
    with caplog.at_level(logging.INFO, logger="fxsp"):
        compile_block(torch.randn(4, 8), explain=True, min_tokens=64)
    assert any("near-miss sp.first at" in r.message and "4 rows < min_tokens 64" in r.message
               for r in caplog.records)


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
    assert all(v == 0 for r in backend.reports for k, v in r.counts.items() if k.startswith(("sp.", "allreduce_norm.")))
    assert backend.fusion_config() is None
    assert any("batch_invariant: sequence parallelism is off" in r.message for r in caplog.records)


def test_fusion_is_off_on_cpu_and_says_why(fake_pg, caplog):
    with caplog.at_level(logging.INFO, logger="fxsp"):
        assert fxsp.backend(None).fusion_config() is None
    assert any("CUDA" in r.message or "cuda" in r.message for r in caplog.records), [r.message for r in caplog.records]


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
    with caplog.at_level(logging.WARNING, logger="fxsp"), torch.no_grad(), \
            torch._dynamo.config.patch(specialize_float=True):
        torch.compile(model, backend=backend, dynamic=True)(model.example_input(8))
    assert not [r for r in caplog.records if "traced Python floats" in r.message]
    assert sp_matches(backend) == 3  # first, middle, last
