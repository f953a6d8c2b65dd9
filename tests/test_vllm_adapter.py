"""fxsp inside vLLM (fxsp/adapters/vllm.py), tested with the real vLLM package.

vLLM is installed without its CUDA dependencies on the CPU torch (see requirements-vllm.txt):
its kernels (`vllm._C`) cannot load, but its config, its post-grad pass manager and the
`torch.ops.vllm` collectives over gloo work. Tests that need vLLM skip when it
is not installed; `make test` installs it.
"""

from __future__ import annotations

import os

# vLLM finds no GPU here and must be told (before it is imported, here and in spawned ranks).
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import contextlib
import copy
import importlib.util
import pickle
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from fxsp.adapters.vllm import PASS_KEY, VLLM_SP_FLAGS, configure
from tests.worlds import run_world

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason=f"vLLM is not installed here (torch {torch.__version__}); `make test` installs it in "
    ".venv only, the torch 2.13 venv: vLLM 0.32 is built against torch 2.13",
)

HIDDEN = 16
SP_MIN_TOKENS = 8
ATTENTION = ["vllm::unified_attention"]  # what vLLM splits the graph at by default


def test_adapter_imports_without_vllm_and_says_what_is_missing():
    code = textwrap.dedent("""
        import sys
        import fxsp.adapters.vllm as adapter
        print("vllm imported:", "vllm" in sys.modules)
        sys.modules["vllm"] = None  # as if vLLM were not installed
        try:
            adapter.FxspVllmPass
        except ImportError as e:
            print("ImportError:", e)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = run.stdout
    assert "vllm imported: False" in out
    assert "ImportError: fxsp.adapters.vllm needs vLLM" in out


# --- configure() -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_config():
    from vllm.config import ParallelConfig, VllmConfig

    return VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=2))


@pytest.fixture
def vllm_config(base_config):
    """A TP-2 VllmConfig without a model. vLLM's CPU platform compiles with plain Inductor
    (DYNAMO_TRACE_ONCE); tests that need the GPU path set mode VLLM_COMPILE."""
    return copy.deepcopy(base_config)


def _as_on_gpu(vllm_config, splitting_ops, graph_partition=False):
    from vllm.config import CompilationMode

    compilation = vllm_config.compilation_config
    compilation.mode = CompilationMode.VLLM_COMPILE
    compilation.splitting_ops = splitting_ops
    compilation.use_inductor_graph_partition = graph_partition
    return vllm_config


@needs_vllm
def test_configure_installs_the_pass_and_splits_compile_ranges(vllm_config):
    from fxsp.adapters.vllm import FxspVllmPass

    configured = configure(vllm_config, min_tokens=64)
    assert configured is vllm_config
    compilation = vllm_config.compilation_config
    graph_pass = compilation.inductor_compile_config[PASS_KEY]
    assert isinstance(graph_pass, FxspVllmPass)
    assert [(r.start, r.end) for r in compilation.get_compile_ranges()] == [(1, 63), (64, 2048)]

    configure(vllm_config, min_tokens=64)  # again: replaces fxsp's own pass, same ranges
    assert compilation.inductor_compile_config[PASS_KEY] is not graph_pass
    assert compilation.compile_ranges_endpoints == [63, 2048]
    assert vllm_config.compute_hash()  # vLLM hashes the pass through its uuid(), before TP exists


@needs_vllm
def test_the_llm_compilation_config_of_docs_vllm_md():
    from vllm.config import ParallelConfig, VllmConfig

    from fxsp.adapters.vllm import FxspVllmPass

    graph_pass = FxspVllmPass(min_tokens=1024)
    config = VllmConfig(
        parallel_config=ParallelConfig(tensor_parallel_size=2),
        compilation_config={
            "use_inductor_graph_partition": True,
            "compile_ranges_endpoints": [1024 - 1],
            "inductor_compile_config": {PASS_KEY: graph_pass},
        },
    )
    compilation = config.compilation_config
    assert compilation.inductor_compile_config[PASS_KEY] is graph_pass
    assert [(r.start, r.end) for r in compilation.get_compile_ranges()] == [(1, 1023), (1024, 2048)]


@needs_vllm
def test_configure_leaves_ranges_alone_when_no_range_reaches_the_threshold(vllm_config):
    configure(vllm_config, min_tokens=1 << 20)
    assert vllm_config.compilation_config.compile_ranges_endpoints == [2048]


@needs_vllm
def test_configure_accepts_whole_graph_compilation_on_the_gpu_path(vllm_config):
    split_after_passes = _as_on_gpu(copy.deepcopy(vllm_config), ATTENTION, graph_partition=True)
    configure(split_after_passes, min_tokens=8)
    configure(_as_on_gpu(vllm_config, []), min_tokens=8)


@needs_vllm
@pytest.mark.parametrize("flag", VLLM_SP_FLAGS)
def test_configure_refuses_vllms_own_sp(vllm_config, flag):
    # vLLM 0.32 has no SP flag; older versions had one of these (a plain attribute stands in).
    object.__setattr__(vllm_config.compilation_config.pass_config, flag, True)
    with pytest.raises(ValueError, match=f"{flag} is on: vLLM's own sequence parallelism"):
        configure(vllm_config, min_tokens=8)


@needs_vllm
def test_configure_refuses_a_runtime_that_expects_a_scattered_residual(vllm_config, monkeypatch):
    # vLLM versions with SP decide the residual layout between pipeline stages with
    # vllm.v1.worker.utils.is_residual_scattered_for_sp; 0.32 has no such function.
    from fxsp.adapters import vllm as adapter

    asked, scattered = [], [True]

    def is_residual_scattered_for_sp(config, tokens):
        asked.append(tokens)
        return scattered[0]

    worker_utils = types.SimpleNamespace(is_residual_scattered_for_sp=is_residual_scattered_for_sp)
    monkeypatch.setitem(sys.modules, "vllm.v1.worker.utils", worker_utils)
    adapter._vllm_residual_check.cache_clear()
    try:
        with pytest.raises(ValueError, match="treat the residual as scattered.*full-size"):
            configure(vllm_config, min_tokens=8)
        assert asked == [2]  # a multiple of the TP size, as vLLM requires
        scattered[0] = False
        configure(vllm_config, min_tokens=8)
    finally:
        adapter._vllm_residual_check.cache_clear()


@needs_vllm
def test_configure_refuses_configs_that_never_run_inductor(vllm_config):
    from vllm.config import CompilationMode

    vllm_config.compilation_config.mode = CompilationMode.NONE
    with pytest.raises(ValueError, match="runs inside Inductor"):
        configure(vllm_config, min_tokens=8)
    vllm_config.compilation_config.mode = CompilationMode.VLLM_COMPILE
    vllm_config.compilation_config.backend = "eager"
    with pytest.raises(ValueError, match="runs inside Inductor"):
        configure(vllm_config, min_tokens=8)


@needs_vllm
def test_configure_refuses_fx_level_piecewise_splitting(vllm_config):
    with pytest.raises(ValueError, match="use_inductor_graph_partition"):
        configure(_as_on_gpu(vllm_config, ATTENTION), min_tokens=8)


@needs_vllm
def test_a_pass_installed_by_hand_refuses_fx_level_piecewise_splitting(vllm_config):
    """The `LLM(...)` route of docs/vllm.md skips configure(): the pass itself refuses, with
    configure's message, both when vLLM asks whether it applies and when it is called."""
    from vllm.config import set_current_vllm_config
    from vllm.config.utils import Range

    from fxsp.adapters.vllm import FxspVllmPass

    graph_pass = FxspVllmPass(min_tokens=SP_MIN_TOKENS)
    piecewise = _as_on_gpu(vllm_config, ATTENTION)
    piecewise.compilation_config.inductor_compile_config[PASS_KEY] = graph_pass
    with set_current_vllm_config(piecewise):
        with pytest.raises(
            ValueError, match="splits the model's graph.*use_inductor_graph_partition"
        ):
            graph_pass.is_applicable_for_range(Range(start=8, end=8))
        with pytest.raises(
            ValueError, match="splits the model's graph.*use_inductor_graph_partition"
        ):
            graph_pass(torch.fx.Graph())
    with set_current_vllm_config(
        _as_on_gpu(copy.deepcopy(vllm_config), ATTENTION, graph_partition=True)
    ):
        assert not graph_pass.is_applicable_for_range(Range(start=8, end=8))  # no TP group here


@needs_vllm
def test_configure_refuses_to_replace_another_post_pass(vllm_config):
    from vllm.compilation.passes.inductor_pass import CallableInductorPass

    other_pass = CallableInductorPass(lambda graph: None)
    vllm_config.compilation_config.inductor_compile_config[PASS_KEY] = other_pass
    with pytest.raises(ValueError, match="already holds"):
        configure(vllm_config, min_tokens=8)


@needs_vllm
def test_configure_refuses_bad_input(vllm_config):
    with pytest.raises(TypeError, match="VllmConfig"):
        configure(object())
    with pytest.raises(ValueError, match="min_tokens must be"):
        configure(vllm_config, min_tokens=-1)
    with pytest.raises(ValueError, match="no model_config: pass min_tokens="):
        configure(vllm_config)  # "auto" needs the model's hidden size and dtype


# --- the pass object ---------------------------------------------------------------------------


@needs_vllm
def test_pass_survives_deepcopy_and_pickle():
    from fxsp.adapters.vllm import FxspVllmPass

    graph_pass = FxspVllmPass(min_tokens=SP_MIN_TOKENS)
    clone = copy.deepcopy(graph_pass)
    assert type(clone) is FxspVllmPass and clone.uuid() == graph_pass.uuid()
    # VllmBackend deep-copies inductor_compile_config: a copy's reports reach the original.
    assert clone.reports is graph_pass.reports
    assert copy.deepcopy({PASS_KEY: graph_pass})[PASS_KEY].reports is graph_pass.reports

    graph_pass.reports.append("a report")
    restored = pickle.loads(pickle.dumps(graph_pass))  # vLLM ships its config to worker processes
    assert type(restored) is FxspVllmPass and restored.uuid() == graph_pass.uuid()
    assert restored.reports == []

    assert FxspVllmPass(min_tokens=SP_MIN_TOKENS + 1).uuid() != graph_pass.uuid()
    assert FxspVllmPass(min_tokens=SP_MIN_TOKENS, fp8=False).uuid() != graph_pass.uuid()


@needs_vllm
def test_pass_needs_vllms_tp_group():
    from vllm.config.utils import Range

    from fxsp.adapters.vllm import FxspVllmPass

    graph_pass = FxspVllmPass(min_tokens=SP_MIN_TOKENS)
    assert not graph_pass.is_applicable_for_range(Range(8, 64))  # no TP group: nothing to shard
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        graph_pass(torch.fx.Graph())


# --- two ranks -----------------------------------------------------------------------------------


def _define_missing_c_ops() -> None:
    """vLLM's FixFunctionalizationPass names `_C.rotary_embedding` on every call, and vLLM's
    kernels (`vllm._C`) do not load on a CPU-only torch: a schema-only placeholder stands in."""
    if not hasattr(torch.ops._C, "rotary_embedding"):
        lib = torch.library.Library("_C", "FRAGMENT")  # noqa: TOR901 - another project's namespace
        lib.define(
            "rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, "
            "Tensor cos_sin_cache, bool is_neox) -> ()"
        )
        _define_missing_c_ops.library = lib  # keep the registration alive


def _weights() -> tuple[torch.Tensor, ...]:
    """Three row-parallel weight shards and a norm weight (the same on every rank: the test is
    about the rewrite, not about sharding)."""
    g = torch.Generator().manual_seed(0)
    matrices = [torch.randn(HIDDEN, HIDDEN, generator=g) / 4 for _ in range(3)]
    return (*matrices, 1 + 0.1 * torch.randn(HIDDEN, generator=g))


def _vllm_model(group_name: str):
    """Three TP layers as vLLM spells them on GPU: `vllm.all_reduce` ops, an HF-style first norm,
    then `vllm_ir.fused_add_rms_norm` (middle, and last with its residual unused)."""
    w0, w1, w2, norm_weight = _weights()

    def model(x: torch.Tensor) -> torch.Tensor:
        h = torch.ops.vllm.all_reduce(x @ w0, group_name)
        normed = norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        h2 = torch.ops.vllm.all_reduce(normed @ w1, group_name)
        normed, residual = torch.ops.vllm_ir.fused_add_rms_norm(h2, h, norm_weight, 1e-6)
        h3 = torch.ops.vllm.all_reduce(normed @ w2, group_name)
        return torch.ops.vllm_ir.fused_add_rms_norm(h3, residual, norm_weight, 1e-5)[0]

    return model


def _cpu_model(tp_group):
    """The same layers as vLLM on CPU runs them: GroupCoordinator.all_reduce, which traces to a
    c10d all-reduce over the TP device group."""
    w0, w1, _, norm_weight = _weights()

    def model(x: torch.Tensor) -> torch.Tensor:
        h = tp_group.all_reduce(x @ w0)
        normed = norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        h2 = tp_group.all_reduce(normed @ w1)
        return torch.ops.vllm_ir.fused_add_rms_norm(h2, h, norm_weight, 1e-6)[0]

    return model


def _inputs(tokens: int, rank: int) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(100 * rank + tokens))


@contextlib.contextmanager
def _out_of_place_all_reduce(tp_group):
    """`vllm.all_reduce` is declared out-of-place and is so on GPU, where vLLM calls it. Driving
    the GPU path on CPU runs it through CpuCommunicator.all_reduce, which reduces into its input
    and returns it: torch rejects that aliasing (an error under CI=1) and Inductor's buffer reuse
    would overwrite the kept input. Give the op its GPU semantics for the span of that path."""
    in_place = tp_group._all_reduce_out_place
    tp_group._all_reduce_out_place = lambda tensor: in_place(tensor.clone())
    try:
        yield
    finally:
        del tp_group._all_reduce_out_place


def _on_rank(rank: int, world: int) -> dict:
    from torch._inductor.compile_fx import compile_fx
    from vllm.compilation.backends import VllmBackend
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config import CompilationMode, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.config.utils import Range
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import destroy_model_parallel, get_tp_group

    from fxsp.adapters.vllm import FxspVllmPass

    _define_missing_c_ops()
    result: dict = {"uuid_before_tp": FxspVllmPass(min_tokens=SP_MIN_TOKENS).uuid()}

    # The GPU path: vLLM's backend and PostGradPassManager, one compile per compile range.
    config = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=world))
    config.compilation_config.mode = CompilationMode.VLLM_COMPILE  # CPU would use plain Inductor
    configure(config, min_tokens=SP_MIN_TOKENS)
    graph_pass = config.compilation_config.inductor_compile_config[PASS_KEY]
    ranges = config.compilation_config.get_compile_ranges()
    with set_current_vllm_config(config):
        init_distributed_environment(world, rank, local_rank=rank, backend="gloo")
        initialize_model_parallel(tensor_model_parallel_size=world, backend="gloo")
        tp_group = get_tp_group()
        backend = VllmBackend(config)
        backend.configure_post_pass()  # takes the pass from inductor_compile_config, as vLLM does
        result["pass_in_manager"] = graph_pass in backend.pass_manager.passes
        result["applicable"] = {
            (r.start, r.end): graph_pass.is_applicable_for_range(r)
            for r in [*ranges, Range(7, 64), Range(8, 8), Range(1, 1)]
        }
        result["uuids"] = [
            graph_pass.uuid(),
            copy.deepcopy(graph_pass).uuid(),
            pickle.loads(pickle.dumps(graph_pass)).uuid(),
        ]

        model, errors = _vllm_model(tp_group.unique_name), {}
        inductor_config = backend.inductor_config

        def inductor(gm: torch.fx.GraphModule, inputs: list):
            return compile_fx(gm, inputs, config_patches=inductor_config)

        with _out_of_place_all_reduce(tp_group):
            for compile_range, token_counts in zip(ranges, [(6, 5), (9, 16)]):
                torch._dynamo.reset()
                compiled = torch.compile(model, fullgraph=True, backend=inductor)
                with pass_context(compile_range):
                    for tokens in token_counts:
                        x = _inputs(tokens, rank)
                        torch._dynamo.mark_dynamic(x, 0)  # as vLLM marks the token dim
                        errors[tokens] = (compiled(x) - model(x)).abs().max().item()
        result["errors"] = errors
        result["reports"] = [(report.counts, report.after) for report in graph_pass.reports]

        # The CPU path: vLLM hands inductor_compile_config to plain Inductor, which calls the
        # pass directly; the graph's all-reduces are c10d ones over the TP device group.
        cpu_config = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=world))
        configure(cpu_config, min_tokens=SP_MIN_TOKENS)
        options = cpu_config.compilation_config.inductor_compile_config
        cpu_pass = options[PASS_KEY]
        torch._dynamo.reset()
        model = _cpu_model(tp_group)
        compiled = torch.compile(model, fullgraph=True, options=options)
        x = _inputs(10, rank)
        result["cpu_error"] = (compiled(x) - model(x)).abs().max().item()
        result["cpu_reports"] = [report.counts for report in cpu_pass.reports]
    destroy_model_parallel()
    return result


@needs_vllm
def test_sp_inside_vllm_on_two_ranks(tmp_path):
    ranks = run_world(2, _on_rank, cache_dir=str(tmp_path / "inductor"))
    for rank, result in enumerate(ranks):
        assert result["pass_in_manager"]
        # configure() split the ranges at min_tokens - 1: SP for (8, 2048), not for (1, 7).
        expected = {(1, 7): False, (8, 2048): True, (7, 64): False, (8, 8): True, (1, 1): False}
        assert result["applicable"] == expected, rank
        assert max(result["errors"].values()) < 1e-5, (rank, result["errors"])

        # The pass ran once, for the SP range; 9 tokens are padded to 10 in the graph.
        assert len(result["reports"]) == 1, rank
        counts, after = result["reports"][0]
        assert counts["raise.vllm_all_reduce"] == 3
        assert counts["raise.vllm_ir_fused_add_rms_norm"] == 2
        assert (counts["sp.first"], counts["sp.middle"], counts["sp.last"]) == (1, 1, 1)
        assert "vllm.reduce_scatter" in after and "vllm.all_gather" in after
        assert "vllm.all_reduce" not in after

        assert result["cpu_error"] < 1e-5, rank
        assert len(result["cpu_reports"]) == 1 and result["cpu_reports"][0]["sp.first"] == 1
        assert result["cpu_reports"][0]["sp.last"] == 1

        # uuid: stable under deepcopy and pickle, covers the TP group and rank.
        assert len(set(result["uuids"])) == 1
        assert result["uuids"][0] != result["uuid_before_tp"]
    assert ranks[0]["uuids"][0] != ranks[1]["uuids"][0]


# --- vLLM's own SP test cases, on two ranks ------------------------------------------------------


def _sp_test_model(group_name: str):
    """vLLM's SP pass test model (tests/compile/passes/distributed/test_sequence_parallelism.py,
    TestAllReduceRMSNormModel) as vLLM 0.32 traces it: relu, then four all-reduce → RMSNorm
    layers; the first norm has no residual, the last one's residual output is unused. Weights
    are inputs so that one compile serves several seeds."""

    def model(x, w0, w1, w2, n0, n1, n2, n3):
        h = residual = torch.ops.vllm.all_reduce(torch.relu(x), group_name)
        y = torch.ops.vllm_ir.rms_norm(h, n0, 1e-6)
        for w, n in ((w0, n1), (w1, n2), (w2, n3)):
            h = torch.ops.vllm.all_reduce(y @ w, group_name)
            y, residual = torch.ops.vllm_ir.fused_add_rms_norm(h, residual, n, 1e-6)
        return y

    return model


def _sp_test_inputs(tokens: int, dtype: torch.dtype, seed: int, rank: int) -> list:
    g = torch.Generator().manual_seed(seed)
    weights = [torch.rand(HIDDEN, HIDDEN, generator=g) / 4 for _ in range(3)]
    norms = [1 + 0.1 * torch.randn(HIDDEN, generator=g) for _ in range(4)]
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1000 * seed + rank))
    return [t.to(dtype) for t in (x, *weights, *norms)]


def _vllm_sp_numerics_on_rank(rank: int, world: int, dtypes: list, seeds: list) -> dict:
    """Eager, vLLM's pass manager without fxsp ("plain") and with it ("fxsp"), per dtype and
    seed: the largest difference of each compiled result from eager."""
    from torch._inductor.compile_fx import compile_fx
    from vllm.compilation.backends import VllmBackend
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config import CompilationMode, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.config.utils import Range
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import destroy_model_parallel, get_tp_group

    _define_missing_c_ops()
    configs = {}
    for name in ("plain", "fxsp"):
        config = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=world))
        config.compilation_config.mode = CompilationMode.VLLM_COMPILE
        if name == "fxsp":
            configure(config, min_tokens=SP_MIN_TOKENS)
        configs[name] = config
    result: dict = {"error": {}, "vs_plain": {}, "reports": []}
    outputs = {}
    with set_current_vllm_config(configs["fxsp"]):
        init_distributed_environment(world, rank, local_rank=rank, backend="gloo")
        initialize_model_parallel(tensor_model_parallel_size=world, backend="gloo")
        tp_group = get_tp_group()
        model = _sp_test_model(tp_group.unique_name)
        with _out_of_place_all_reduce(tp_group):
            for name, config in configs.items():
                with set_current_vllm_config(config):
                    backend = VllmBackend(config)
                    backend.configure_post_pass()
                    options = backend.inductor_config

                    def inductor(gm, inputs, options=options):
                        return compile_fx(gm, inputs, config_patches=options)

                    for dtype in dtypes:
                        torch._dynamo.reset()
                        compiled = torch.compile(model, fullgraph=True, backend=inductor)
                        with pass_context(Range(SP_MIN_TOKENS, 2048)):
                            for seed in seeds:
                                inputs = _sp_test_inputs(15 + seed, dtype, seed, rank)
                                torch._dynamo.mark_dynamic(inputs[0], 0)
                                want, got = model(*inputs), compiled(*inputs)
                                error = (got.float() - want.float()).abs().max().item()
                                result["error"][(name, str(dtype), seed)] = error
                                outputs[(name, str(dtype), seed)] = got
                                if name == "fxsp":
                                    plain = outputs[("plain", str(dtype), seed)]
                                    result["vs_plain"][(str(dtype), seed)] = (
                                        (got.float() - plain.float()).abs().max().item()
                                    )
                    if name == "fxsp":
                        graph_pass = config.compilation_config.inductor_compile_config[PASS_KEY]
                        result["reports"] = [(r.counts, r.after) for r in graph_pass.reports]
    destroy_model_parallel()
    return result


@needs_vllm
def test_vllms_sp_model_keeps_vllms_ops_and_numerics(tmp_path):
    """vLLM's own SP test asserts 4 matches, 4 reduce-scatters and 4 all-gathers, no all-reduce,
    and vLLM's norm ops still in the graph. fxsp must also compute what the unrewritten model
    computes, within the tolerance vLLM's pass manager without fxsp meets (fp16, bf16, seeds)."""
    dtypes, seeds = [torch.float16, torch.bfloat16], [0, 1, 2]
    ranks = run_world(
        2, _vllm_sp_numerics_on_rank, dtypes, seeds, cache_dir=str(tmp_path / "inductor")
    )
    for rank, result in enumerate(ranks):
        errors = result["error"]
        for dtype in map(str, dtypes):
            # The bar: the largest error of vLLM's own compile without fxsp, over the seeds.
            bar = max(errors[("plain", dtype, seed)] for seed in seeds)
            assert all(errors[("fxsp", dtype, seed)] <= bar for seed in seeds), (rank, errors)
            assert all(result["vs_plain"][(dtype, seed)] <= bar for seed in seeds), rank
        assert len(result["reports"]) == len(dtypes), rank
        for counts, after in result["reports"]:
            assert (counts["sp.first"], counts["sp.middle"], counts["sp.last"]) == (1, 2, 1)
            assert after.count("vllm.reduce_scatter") == 4 and after.count("vllm.all_gather") == 4
            assert "vllm.all_reduce" not in after
            # vLLM's own ops, on the shards: vLLM still picks their kernels and fuses them.
            assert "vllm_ir.rms_norm" in after and "vllm_ir.fused_add_rms_norm" in after


def _async_tp_on_rank(rank: int, world: int) -> dict:
    """Both paths of _on_rank with async_tp=True and symmetric memory mocked (the fused ops run
    torch's reference kernels over gloo): errors against eager and the coverage of each graph."""
    from torch._inductor.compile_fx import compile_fx
    from vllm.compilation.backends import VllmBackend
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config import CompilationMode, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import destroy_model_parallel, get_tp_group

    from fxsp.testing.async_tp import mocked_symmetric_memory

    _define_missing_c_ops()
    result: dict = {}
    config = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=world))
    config.compilation_config.mode = CompilationMode.VLLM_COMPILE
    configure(config, min_tokens=SP_MIN_TOKENS, async_tp=True)
    graph_pass = config.compilation_config.inductor_compile_config[PASS_KEY]
    sp_range = config.compilation_config.get_compile_ranges()[-1]
    with set_current_vllm_config(config):
        init_distributed_environment(world, rank, local_rank=rank, backend="gloo")
        initialize_model_parallel(tensor_model_parallel_size=world, backend="gloo")
        tp_group = get_tp_group()
        backend = VllmBackend(config)
        backend.configure_post_pass()
        inductor_config = backend.inductor_config

        def inductor(gm: torch.fx.GraphModule, inputs: list):
            return compile_fx(gm, inputs, config_patches=inductor_config)

        model, errors = _vllm_model(tp_group.unique_name), {}
        with mocked_symmetric_memory(), _out_of_place_all_reduce(tp_group), pass_context(sp_range):
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, backend=inductor)
            for tokens in (9, 16):
                x = _inputs(tokens, rank)
                torch._dynamo.mark_dynamic(x, 0)
                errors[tokens] = (compiled(x) - model(x)).abs().max().item()
        result["errors"] = errors
        result["sites"] = [
            (r.async_tp.fusable, r.async_tp.fused, r.after) for r in graph_pass.reports
        ]

        cpu_config = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=world))
        configure(cpu_config, min_tokens=SP_MIN_TOKENS, async_tp=True)
        options = cpu_config.compilation_config.inductor_compile_config
        cpu_pass = options[PASS_KEY]
        model = _cpu_model(tp_group)
        with mocked_symmetric_memory():
            torch._dynamo.reset()
            x = _inputs(9, rank)
            result["cpu_error"] = (
                (torch.compile(model, fullgraph=True, options=options)(x) - model(x))
                .abs()
                .max()
                .item()
            )
        result["cpu_sites"] = [(r.async_tp.fusable, r.async_tp.fused) for r in cpu_pass.reports]
    destroy_model_parallel()
    return result


@needs_vllm
def test_async_tp_inside_vllm_fuses_every_site(tmp_path):
    """vLLM runs fxsp after Inductor's micro-pipeline TP, so the adapter runs it right after SP,
    over c10d collectives on the TP device group (vLLM's own are unknown to it)."""
    for rank, result in enumerate(
        run_world(2, _async_tp_on_rank, cache_dir=str(tmp_path / "inductor"))
    ):
        assert max(result["errors"].values()) < 1e-5, (rank, result["errors"])
        ((fusable, fused, after),) = result["sites"]
        # x @ w0 → reduce-scatter, all-gather → @ w1, all-gather → @ w2; the reduce-scatters
        # after w1 and w2 follow an all-gather fused with their matmul, so stay as they are.
        assert fusable == fused == 3, (rank, result["sites"])
        assert (
            "_c10d_functional.reduce_scatter_tensor" in after and "vllm.reduce_scatter" not in after
        )
        assert result["cpu_error"] < 1e-5, rank
        assert result["cpu_sites"] == [(2, 2)], (rank, result["cpu_sites"])
