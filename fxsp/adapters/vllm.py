"""fxsp inside vLLM: sequence parallelism as a vLLM post-grad pass.

    from fxsp.adapters.vllm import configure
    vllm_config = configure(EngineArgs(model=..., tensor_parallel_size=2).create_engine_config())

`configure` installs `FxspVllmPass` as `compilation_config.inductor_compile_config
["post_grad_custom_post_pass"]`, splits vLLM's compile ranges at fxsp's SP threshold and refuses
configurations where fxsp's SP would be wrong or pointless. Where vLLM builds the config itself
(`LLM(...)`, `vllm serve`), the pass object goes into the compilation config directly; see
docs/vllm.md for both.

How the pass fits vLLM:

- vLLM runs the custom post pass inside its PostGradPassManager (after its own fusions, before it
  lowers its IR ops), only for compile ranges where `is_applicable_for_range` says yes: ranges
  whose smallest token count reaches the SP threshold. Where vLLM compiles with plain Inductor
  (on CPU: DYNAMO_TRACE_ONCE), Inductor calls the pass directly and fxsp's own row threshold
  decides per graph.
- The rewrite emits collectives of the flavour it replaces (fxsp/ir/collectives.py):
  `vllm.all_reduce(x, "tp:0")` becomes `vllm.reduce_scatter` / `vllm.all_gather` over the same
  group. vLLM on CPU traces its all-reduce to `_c10d_functional` over the TP device group, and
  that stays c10d.
- Graph outputs keep their full size: fxsp all-gathers every sharded value before it leaves the
  rewritten norms, and pads token counts the TP size does not divide inside the graph. So vLLM's
  runtime needs no padding to a multiple of the TP size, and must not expect a residual
  scattered between pipeline stages (what vLLM's own SP needed); `configure` refuses that.
- Async TP (`async_tp=True`): vLLM runs this pass after Inductor's micro-pipeline TP, so the
  pass runs that fusion itself right after SP, with the collectives spelled as c10d ones over
  the TP device group (micro-pipeline TP knows no `vllm.*` collectives).
- The pass must see the whole model: with vLLM's FX-level piecewise splitting every residual
  would leave its piece, all-gathered, and SP would cost more than it saves.
"""

from __future__ import annotations

import functools
import importlib
import logging
import types
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch.fx import Graph

from ..compile.cache import cache_key
from ..compile.options import VLLM_OPTIONS, Configs, Options, TPGroup
from ..compile.passes import run_passes
from ..compile.report import GraphReport
from ..ir.collectives import C10D_ALL_REDUCE, vllm_op
from ..policy.thresholds import SPThreshold, sp_min_tokens

log = logging.getLogger("fxsp")

PASS_KEY = "post_grad_custom_post_pass"
# PassConfig flags of vLLM's own SP pass: `enable_sequence_parallelism` up to v0.12, then
# `enable_sp`. vLLM 0.32 has neither.
VLLM_SP_FLAGS = ("enable_sp", "enable_sequence_parallelism")
# vLLM's CompilationMode: NONE=0; STOCK_TORCH_COMPILE=1 and DYNAMO_TRACE_ONCE=2 hand
# inductor_compile_config to plain Inductor; VLLM_COMPILE=3 uses vLLM's backend and pass manager.
_NO_COMPILE, _VLLM_COMPILE = 0, 3


def vllm_tp_group() -> TPGroup | None:
    """vLLM's TP group in this process, or None before `initialize_model_parallel`: named as
    `vllm.all_reduce` names it (GroupCoordinator.unique_name, "tp:0"), with its device group's
    c10d name (what a traced dist.all_reduce carries, on CPU)."""
    parallel_state = _import_vllm("vllm.distributed.parallel_state")
    if not parallel_state.model_parallel_is_initialized():
        return None
    tp = parallel_state.get_tp_group()
    return TPGroup(tp.unique_name, tp.device_group.group_name, tp.world_size, tp.rank_in_group)


class _FxspVllmPassImpl:
    """fxsp's passes (raise → SP rules → clean up → lower) as a vLLM InductorPass.

        FxspVllmPass(min_tokens="auto", fp8=True, explain=False, hidden_size=None, dtype=None,
                     async_tp=False)

    `min_tokens="auto"` takes the threshold from `fxsp.policy.sp_min_tokens` for the model's
    hidden size and dtype (given here, by `configure`, or read from vLLM's current config).
    `.reports` holds one `GraphReport` per graph the pass rewrote. A deepcopy shares `.reports`
    with its original (vLLM deep-copies its Inductor config); a pickled copy starts empty.
    With `async_tp`, each report's `.async_tp` says how many SP sites were fusable and fused.
    """

    def __init__(
        self,
        *,
        min_tokens: int | str = "auto",
        fp8: bool = True,
        explain: bool = False,
        hidden_size: int | None = None,
        dtype: torch.dtype | None = None,
        async_tp: bool = False,
    ) -> None:
        # fxsp's options (checked there); vLLM runs its own fused all-reduce + norm.
        self.options = Options(
            min_tokens=min_tokens,
            fp8=fp8,
            explain=explain,
            async_tp=async_tp,
            allreduce_fusion=False,
        )
        if hidden_size is not None and not (
            isinstance(hidden_size, int) and not isinstance(hidden_size, bool) and hidden_size > 0
        ):
            raise ValueError(f"hidden_size must be None or an int > 0, not {hidden_size!r}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be None or a torch.dtype, not {dtype!r}")
        self._configs = Configs(self.options)
        self.hidden_size, self.dtype = hidden_size, dtype
        self.reports: list[GraphReport] = []

    def threshold(self, tp_size: int) -> SPThreshold:
        """The SP token threshold at `tp_size`; `min_tokens is None`: SP off, `reason` says why."""
        min_tokens = self.options.min_tokens
        if min_tokens != "auto":
            return SPThreshold(min_tokens, f"min_tokens={min_tokens} set by the caller")
        hidden_size, dtype = self.hidden_size, self.dtype
        if hidden_size is None or dtype is None:
            hidden_size, dtype = _model_shape_from_current_config()
        return sp_min_tokens(hidden_size, tp_size, dtype)

    def is_applicable_for_range(self, compile_range: Any) -> bool:
        """SP for a vLLM compile range (`.start`, `.end`, inclusive) when every token count in it
        reaches the threshold. Rank-independent: every rank must decide alike."""
        _check_current_config()
        tp = vllm_tp_group()
        if tp is None or tp.world < 2:
            return False
        return self.threshold(tp.world).use_sp(compile_range.start)

    def __call__(self, graph: Graph) -> None:
        _check_current_config()
        tp = vllm_tp_group()
        if tp is None:
            raise RuntimeError(
                "fxsp's vLLM pass ran before vLLM's tensor-parallel group exists "
                "(init_distributed_environment / initialize_model_parallel)"
            )
        if tp.world < 2:
            return
        compile_range = _current_compile_range()
        if compile_range is None:
            # Plain Inductor (vLLM on CPU): fxsp judges each graph's rows itself; symbolic rows
            # are only rewritten when the threshold is 0.
            min_tokens = self.options.min_tokens
        elif self.is_applicable_for_range(compile_range):
            min_tokens = 0  # every token count of the range reaches the threshold
        else:
            return
        sp = self._configs.sp(tp, min_tokens=min_tokens, group=_tp_group_name_in(graph, tp))
        sp = self._configs.sp_for_graph(sp)
        report = run_passes(graph, sp, explain=self.options.explain)
        if sp is not None and sp.async_tp:
            from ..compile.async_tp import fuse_now

            report.async_tp = fuse_now(graph)
        self.reports.append(report)

    def uuid(self) -> str:
        """Covers fxsp's version and source, the options and the TP group with this rank: the
        rewrite may slice this rank's rows, while Inductor's cache key is the same on every rank.
        (vLLM also hashes its config before the TP group exists; that hash has no TP part.)"""
        tp = vllm_tp_group()
        options = {name: getattr(self.options, name) for name in VLLM_OPTIONS}
        return cache_key(
            options, self.hidden_size, str(self.dtype), asdict(tp) if tp is not None else None
        )

    def __deepcopy__(self, memo: dict) -> Any:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)  # `reports` (and what was said once) shared on purpose
        return clone

    def __getstate__(self) -> dict:
        return {**self.__dict__, "reports": []}  # another process keeps its own reports

    def __repr__(self) -> str:
        o = self.options
        return (
            f"FxspVllmPass(min_tokens={o.min_tokens!r}, fp8={o.fp8}, explain={o.explain}, "
            f"async_tp={o.async_tp})"
        )


def __getattr__(name: str) -> Any:
    # FxspVllmPass subclasses vLLM's InductorPass, so it can only exist once vLLM is imported;
    # building it on first use keeps `import fxsp.adapters.vllm` free of vLLM.
    if name == "FxspVllmPass":
        return _pass_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _pass_class() -> type:
    def body(namespace: dict) -> None:
        namespace.update(__module__=__name__, __doc__=_FxspVllmPassImpl.__doc__)

    cls = types.new_class(
        "FxspVllmPass", (_FxspVllmPassImpl, _inductor_pass_module().InductorPass), exec_body=body
    )
    globals()["FxspVllmPass"] = cls  # later lookups, pickle's among them, find it directly
    return cls


def configure(
    vllm_config: Any,
    *,
    min_tokens: int | str = "auto",
    fp8: bool = True,
    explain: bool = False,
    async_tp: bool = False,
) -> Any:
    """Set `vllm_config` (a `VllmConfig`) up for fxsp's SP and return it.

    Installs a `FxspVllmPass` (hidden size and dtype from the model config) as the post-grad
    custom post pass and adds threshold - 1 to the compile range endpoints, so the range below
    the threshold compiles without SP and the one from it with SP. Raises ValueError when vLLM's
    own SP is on (both would rewrite the graph; its runtime would expect a scattered residual),
    when no Inductor compile would run the pass, when vLLM splits the graph into pieces before
    the passes, or when another custom post pass is installed.
    """
    if not hasattr(vllm_config, "compilation_config"):
        kind = type(vllm_config).__name__
        raise TypeError(f"configure() takes a vllm.config.VllmConfig, not {kind}")
    refuse_conflicts(vllm_config)
    compilation = vllm_config.compilation_config
    _require_inductor(compilation)
    _require_whole_graph(compilation)
    existing = compilation.inductor_compile_config.get(PASS_KEY)
    if existing is not None and not isinstance(existing, _FxspVllmPassImpl):
        raise ValueError(
            f"compilation_config.inductor_compile_config[{PASS_KEY!r}] already "
            f"holds {existing!r}; vLLM runs one custom post pass, and fxsp's would "
            "replace it"
        )
    model = vllm_config.model_config
    if min_tokens == "auto" and model is None:
        raise ValueError(
            "min_tokens='auto' needs the model's hidden size and dtype, and this "
            "VllmConfig has no model_config: pass min_tokens="
        )
    graph_pass = _pass_class()(
        min_tokens=min_tokens,
        fp8=fp8,
        explain=explain,
        async_tp=async_tp,
        hidden_size=model.get_hidden_size() if model is not None else None,
        dtype=model.dtype if model is not None else None,
    )
    compilation.inductor_compile_config[PASS_KEY] = graph_pass
    _split_compile_ranges(vllm_config, graph_pass)
    return vllm_config


def refuse_conflicts(vllm_config: Any) -> None:
    """Raise ValueError if vLLM's own SP pass would rewrite the graph too, or if vLLM's runtime
    would expect a residual scattered across TP ranks (fxsp keeps graph outputs full-size)."""
    pass_config = vllm_config.compilation_config.pass_config
    for flag in VLLM_SP_FLAGS:
        if getattr(pass_config, flag, False):
            raise ValueError(
                f"compilation_config.pass_config.{flag} is on: vLLM's own sequence "
                "parallelism pass would rewrite the same graph as fxsp's. Turn it "
                "off to use fxsp (or drop fxsp's pass to use vLLM's)."
            )
    # vLLM's own answer where it has one: catches its SP under a flag name not listed above.
    scattered = _scattered_residual(vllm_config)
    if scattered is not None:
        raise ValueError(
            f"vLLM's runtime would treat the residual as scattered across TP ranks "
            f"({scattered}), but fxsp keeps every graph output full-size: turn off "
            "vLLM's sequence parallelism to use fxsp"
        )


# --- helpers -----------------------------------------------------------------------------------


def _check_current_config() -> None:
    """The checks `configure` makes, again on vLLM's current config where one is set: a pass put
    into the compilation config by hand (`LLM(...)`) never went through `configure`."""
    current = _current_vllm_config()
    if current is not None:
        refuse_conflicts(current)
        _require_whole_graph(current.compilation_config)


def _import_vllm(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"fxsp.adapters.vllm needs vLLM ({module}: {e}). Install it with "
            "`pip install 'fxsp[vllm]'`; without a GPU, see docs/vllm.md"
        ) from e


@functools.cache
def _inductor_pass_module() -> types.ModuleType:
    """The vLLM module holding InductorPass and its compile-range context."""
    _import_vllm("vllm")
    # vllm/compilation/passes/ in recent vLLM; vllm/compilation/ before.
    for name in ("vllm.compilation.passes.inductor_pass", "vllm.compilation.inductor_pass"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ImportError("this vLLM has no vllm.compilation(.passes).inductor_pass module")


def _current_compile_range() -> Any:
    """The compile range vLLM's PostGradPassManager is compiling for, or None outside it."""
    get_pass_context = getattr(_inductor_pass_module(), "get_pass_context", None)
    if get_pass_context is None:  # a vLLM without compile ranges
        return None
    try:
        return get_pass_context().compile_range
    except AssertionError:  # no pass context: Inductor called the pass directly
        return None


def _current_vllm_config() -> Any:
    return _import_vllm("vllm.config").get_current_vllm_config_or_none()


def _model_shape_from_current_config() -> tuple[int, torch.dtype]:
    current = _current_vllm_config()
    model = current.model_config if current is not None else None
    if model is None:
        raise ValueError(
            "min_tokens='auto' needs the model's hidden size and dtype: create the "
            "pass with hidden_size= and dtype=, use configure(vllm_config), or pass "
            "min_tokens="
        )
    return model.get_hidden_size(), model.dtype


def _tp_group_name_in(graph: Graph, tp: TPGroup) -> str:
    """The name the graph's all-reduces give the TP group: vLLM's own where `vllm.all_reduce`
    appears, else the device group's c10d name (vLLM on CPU traces to c10d collectives)."""
    vllm_all_reduce = vllm_op("all_reduce")
    if vllm_all_reduce is not None and graph.find_nodes(op="call_function", target=vllm_all_reduce):
        return tp.name
    if graph.find_nodes(op="call_function", target=C10D_ALL_REDUCE):
        return tp.c10d_name
    return tp.name


@functools.cache
def _vllm_residual_check() -> Callable | None:
    """vLLM's `is_residual_scattered_for_sp(config, tokens)`, or None where this vLLM has none
    (0.32) or its worker module does not import (looked up once: a failed import would re-run)."""
    try:
        return importlib.import_module("vllm.v1.worker.utils").is_residual_scattered_for_sp
    except (ImportError, AttributeError):
        return None


def _scattered_residual(vllm_config: Any) -> str | None:
    """Why vLLM's runtime would expect a scattered residual, or None. Asks at token counts that
    are multiples of the TP size, the only ones vLLM's check accepts."""
    check = _vllm_residual_check()
    if check is None:
        return None
    tp = vllm_config.parallel_config.tensor_parallel_size
    compile_sizes = vllm_config.compilation_config.compile_sizes or []
    for tokens in sorted({tp, *[s for s in compile_sizes if isinstance(s, int) and s % tp == 0]}):
        try:
            if check(vllm_config, tokens):
                return f"is_residual_scattered_for_sp(config, {tokens}) is True"
        except AssertionError as e:  # its consistency checks, which only run with its SP on
            return f"is_residual_scattered_for_sp(config, {tokens}) failed: {e}"
    return None


def _require_inductor(compilation: Any) -> None:
    """Only Inductor runs post-grad passes: vLLM's backend (VLLM_COMPILE) or plain torch.compile
    (STOCK_TORCH_COMPILE, DYNAMO_TRACE_ONCE), with backend 'inductor' either way."""
    mode = compilation.mode
    if mode is None or int(mode) == _NO_COMPILE or compilation.backend != "inductor":
        raise ValueError(
            f"fxsp's pass runs inside Inductor, and this config compiles with mode="
            f"{mode!r}, backend={compilation.backend!r}: use mode VLLM_COMPILE (3) "
            "with backend 'inductor', and do not enforce eager"
        )


def _require_whole_graph(compilation: Any) -> None:
    if (
        int(compilation.mode) == _VLLM_COMPILE
        and compilation.splitting_ops
        and not compilation.use_inductor_graph_partition
    ):
        raise ValueError(
            f"vLLM splits the model's graph at {compilation.splitting_ops} before Inductor, so "
            "fxsp's pass would see pieces whose residual leaves every piece full-size: SP would "
            "cost more than it saves. Build the config with compilation_config="
            "{'use_inductor_graph_partition': True} (splits after the passes, keeps piecewise "
            "CUDA graphs) or {'splitting_ops': [], 'cudagraph_mode': 'FULL'}"
        )


def _split_compile_ranges(vllm_config: Any, graph_pass: _FxspVllmPassImpl) -> None:
    """Add threshold - 1 to the compile range endpoints (ranges are [1, e0], [e0 + 1, e1], ...),
    so one range ends just below the threshold and the next starts at it."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp < 2:
        log.info("fxsp: TP size 1, sequence parallelism has nothing to do")
        return
    threshold = graph_pass.threshold(tp)
    if threshold.min_tokens is None:
        log.warning("fxsp: sequence parallelism off: %s", threshold.reason)
        return
    compilation = vllm_config.compilation_config
    endpoints = sorted(set(compilation.compile_ranges_endpoints or []))
    largest = vllm_config.scheduler_config.max_num_batched_tokens
    boundary = threshold.min_tokens - 1
    if largest is not None and threshold.min_tokens > largest:
        log.warning(
            "fxsp: SP threshold %d tokens (%s) is above max_num_batched_tokens %d: no "
            "compile range gets SP",
            threshold.min_tokens,
            threshold.reason,
            largest,
        )
    elif boundary >= 1 and boundary not in endpoints:
        compilation.compile_ranges_endpoints = sorted([*endpoints, boundary])
