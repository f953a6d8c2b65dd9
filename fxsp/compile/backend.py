"""`fxsp.backend(tp_group)`: a torch.compile backend that makes TP models sequence-parallel.

    torch.compile(model, backend=fxsp.backend(tp_group))

Dynamo graph → AOT autograd → post-grad ATen graph → fxsp's passes (raise → SP rules →
clean up → lower) → Inductor codegen. They run as Inductor's post-grad *pre* pass:
Inductor's own passes, micro-pipeline TP among them, run after it and so see the new
reduce-scatter / all-gather and can fuse them with the neighbouring matmuls.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from typing import Any

import torch
import torch.distributed as dist

from ..runtime.guard import RankGuard, decisions_fingerprint, fingerprint, graph_structure
from ..runtime.row_dispatch import RowDispatch
from ..sp.allreduce_norm import AllReduceNormConfig
from ..sp.rules import SPConfig
from .cache import cache_key, load_reports, report_key, save_reports, source_digest
from .options import Configs, Options, TPGroup
from .passes import run_passes
from .report import GraphReport

log = logging.getLogger("fxsp")


def backend(tp_group: Any = None, **options: Any) -> Backend:
    """A torch.compile backend applying sequence parallelism over `tp_group`.

    `tp_group`: a ProcessGroup, a 1-D DeviceMesh, or None for the default group.
    Options: see `Options`. A bad group or option raises here, saying what is allowed.
    """
    allowed = [f.name for f in fields(Options)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"fxsp.backend() got unexpected keyword arguments {unknown}; its options are "
            f"{', '.join(allowed)}"
        )
    return Backend(tp_group, Options(**options))


def _traced_floats(gm: torch.fx.GraphModule) -> list[str]:
    """Sources of the graph inputs that Dynamo made of Python floats (passed as 0-d tensors)."""
    names = []
    for node in gm.graph.find_nodes(op="placeholder"):
        arg = node.meta.get("grapharg")
        if (
            arg is not None
            and arg.pass_arg_as_tensor
            and arg.fake_tensor is not None
            and arg.fake_tensor.dtype.is_floating_point
        ):
            name = arg.source.name
            names.append(name() if callable(name) else name)  # a method before torch 2.13
    return names


class Backend:
    def __init__(self, tp_group: Any, options: Options) -> None:
        _check_group(tp_group)
        self.tp_group = tp_group
        self.options = options
        self._group: dist.ProcessGroup | None = None
        self.reports: list[GraphReport] = []
        # One per graph compiled with a backward: the SP sites rewritten on Dynamo's graph.
        self.training_reports: list = []  # training.dtensor.TrainingReport
        self.configs = Configs(options)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        sp = self.sp_config()
        if sp is not None:
            self._name_traced_floats(gm)
        seen = len(self.reports)
        post_grad_sp, training, trained = sp, None, None
        if sp is not None and _with_backward(example_inputs):
            # SP for training happens here, on Dynamo's graph, before AOT autograd derives the
            # backward (docs/training.md); the post-grad pass then has nothing left to rewrite.
            from ..training.dtensor import sequence_parallel  # imports DTensor: only here

            training = sequence_parallel(
                gm, self.options.min_tokens, dropout=self.options.sharded_dropout
            )
            self.training_reports.append(training)
            if training.sites:
                post_grad_sp, trained = None, sp
        compiled, reports = self._compile_variants(gm, example_inputs, post_grad_sp, trained)
        for report in reports if training is not None else ():
            report.counts.update(training.counts)
        if sp is None or not self.options.check_ranks:
            return compiled
        facts = fingerprint(
            source_digest(),
            asdict(self.options),
            {**asdict(sp), "rank": None},
            graph_structure(gm),
            [_input_type(a) for a in example_inputs],
        )
        return RankGuard(
            compiled, self.group, facts, decisions_fingerprint(reports), what=f"graph {seen}"
        )

    def _name_traced_floats(self, gm: torch.fx.GraphModule) -> None:
        """Say once which Python floats Dynamo made graph inputs: a norm whose eps is one has no
        constant eps to match, so it silently stays as it is otherwise."""
        new = self.configs.once.new([("traced float", name) for name in _traced_floats(gm)])
        if new:
            log.warning(
                "fxsp: Dynamo traced Python floats as graph inputs (%s); a norm whose eps is "
                "one is not rewritten. torch.compile(dynamic=True) does this: set "
                "torch._dynamo.config.specialize_float = True, or mark the token dims with "
                "torch._dynamo.mark_dynamic instead.",
                ", ".join(name for _, name in new),
            )

    def _compile_variants(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: list,
        sp: SPConfig | None,
        trained: SPConfig | None = None,
    ) -> tuple:
        """(the compiled callable, the reports of the graphs compiled for it now)."""
        if sp is None or not self._may_dispatch(example_inputs):
            return self._compile(gm, example_inputs, sp, trained)
        # Symbolic rows: the SP variant's graph cannot know whether a batch reaches min_tokens,
        # so a non-SP variant is compiled beside it and each call picks one by its row count.
        plain_gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        # The row thresholds are symbolic expressions read off the pass, which must run: no
        # compile cache for the SP variant (the reports cache keeps them only as text).
        with _no_compile_cache():
            with_sp, sp_reports = self._compile(gm, example_inputs, replace(sp, dispatch=True))
        thresholds = [t for r in sp_reports for t in r.row_thresholds]
        if not thresholds:
            return with_sp, sp_reports
        without_sp, plain_reports = self._compile(plain_gm, example_inputs, None)
        return RowDispatch(
            with_sp, without_sp, thresholds, example_inputs
        ), sp_reports + plain_reports

    def _compile(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: list,
        sp: SPConfig | None,
        trained: SPConfig | None = None,
    ) -> tuple:
        """(the compiled callable, the reports of the graphs compiled for it now), cache hit or
        not. `trained`: the settings SP was done with on Dynamo's graph (training), where none is
        left for the pass; the fusion (async TP) still follows them."""
        _register_pass()
        graph_pass = FxspPass(self, sp, self.fusion_config())
        joint_patches = {}
        if trained and self.options.recompute_gathers:
            from ..training.recompute import RecomputeGathers

            joint_patches["joint_custom_pre_pass"] = RecomputeGathers()
        if self.options.inner == "eager":  # no Inductor, no cache: the pass always runs
            compiled = _compile_eager(gm, example_inputs, graph_pass, joint_patches)
            graph_pass.compiled = True
            return compiled, list(graph_pass.reports["compile"])
        from torch._inductor.compile_fx import compile_fx

        from ..patches.inductor_reuse import install as install_reuse_patch

        install_reuse_patch(enabled=self.options.inductor_reuse_patch)  # a no-op off torch 2.11

        patches = {"post_grad_custom_pre_pass": graph_pass, **joint_patches}
        settings = sp if sp is not None else trained
        if settings is not None and settings.async_tp:
            from .async_tp import async_tp_patches

            patches.update(async_tp_patches(graph_pass))

        def compile_with_pass(graph_module: torch.fx.GraphModule) -> Callable:
            compiled = compile_fx(graph_module, example_inputs, config_patches=patches)
            graph_pass.compiled = True
            return compiled

        if not _compile_cache_on():
            return compile_with_pass(gm), list(graph_pass.reports["compile"])
        # An Inductor or AOT autograd cache hit skips the pass: its reports are read back from
        # what the run that filled the cache saved, under a key taken before compile_fx runs
        # Inductor's pre-grad passes on `gm` in place.
        graph_pass.key = report_key(graph_pass.uuid(), gm, example_inputs)
        spare = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        compiled = compile_with_pass(gm)
        if graph_pass.reports["compile"]:
            graph_pass.save()
            return compiled, list(graph_pass.reports["compile"])
        cached = load_reports(graph_pass.key)
        if cached is not None:
            self.reports += cached["compile"] + cached["later"]
            if self.options.explain:
                for report in cached["compile"] + cached["later"]:
                    report.log_near_misses()
            return compiled, cached["compile"]
        # A hit without fxsp's reports (their file was removed): compile again, pass included.
        log.info(
            "fxsp: Inductor reused a compiled graph whose fxsp report is missing; "
            "compiling it again"
        )
        graph_pass.compiled = False
        with _no_compile_cache():
            compiled = compile_with_pass(spare)
        graph_pass.save()
        return compiled, list(graph_pass.reports["compile"])

    def _may_dispatch(self, example_inputs: list) -> bool:
        """Symbolic sizes and a threshold that may be above zero."""
        symbolic = any(
            isinstance(a, torch.SymInt) or (isinstance(a, torch.Tensor) and _has_symbolic_size(a))
            for a in example_inputs
        )
        if not symbolic or self.options.min_tokens == 0:
            return False
        if self.options.min_tokens == "auto":  # 0 off CUDA: see policy.thresholds
            return any(
                isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in example_inputs
            )
        return True

    @property
    def group(self) -> dist.ProcessGroup:
        """The TP process group, resolved on first use (the default group may not exist when
        the backend is made) and kept."""
        if self._group is None:
            self._group = _process_group(self.tp_group)
        return self._group

    def sp_config(self) -> SPConfig | None:
        """The SP settings for this process, or None when TP size is 1 (nothing to rewrite)."""
        return self.configs.sp(TPGroup.of(self.group))

    def fusion_config(self) -> AllReduceNormConfig | None:
        """The fused all-reduce + RMSNorm settings, or None where policy.fusion rules it out
        (it logs why, once per backend)."""
        return self.configs.fusion(TPGroup.of(self.group))


def _register_pass() -> None:
    """Make FxspPass an Inductor CustomGraphPass (what Inductor's cache key asks for), here
    rather than at import: importing Inductor takes a second that `import fxsp` should not."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from ..training.recompute import RecomputeGathers

    CustomGraphPass.register(FxspPass)
    CustomGraphPass.register(RecomputeGathers)


class FxspPass:
    """fxsp's passes as an Inductor post-grad pass (a CustomGraphPass: `_register_pass`). Its
    uuid covers fxsp's source, the options and the TP group *and rank*: the rewritten graph holds
    rank-specific slice offsets, while Inductor's cache key is otherwise the same on every rank.

    With a `key`, the reports of the graphs it rewrites are also saved as JSON in Inductor's
    cache dir, for the processes that will reuse those compiled graphs without running it:
    those of compile time (the forward) and any of later (a backward AOT autograd compiles
    lazily)."""

    def __init__(
        self, owner: Backend, sp: SPConfig | None, fusion: AllReduceNormConfig | None = None
    ) -> None:
        self.owner, self.sp, self.fusion = owner, sp, fusion
        self.key: str | None = None
        self.compiled = False  # compile_fx has returned: any further graph is a lazy backward
        self.reports: dict[str, list] = {"compile": [], "later": []}

    def __call__(self, graph: torch.fx.Graph) -> None:
        sp = self.owner.configs.sp_for_graph(self.sp)
        report = run_passes(graph, sp, explain=self.owner.options.explain, fusion=self.fusion)
        self.owner.reports.append(report)
        self.report = report  # async_tp's post pass adds the fusion coverage to it
        self.reports["later" if self.compiled else "compile"].append(report)
        if self.compiled:
            self.save()

    def save(self) -> None:
        if self.key is not None:
            save_reports(self.key, self.reports)

    def uuid(self) -> str:
        return cache_key(
            asdict(self.owner.options),
            asdict(self.sp) if self.sp else None,
            asdict(self.fusion) if self.fusion else None,
        )


def _with_backward(example_inputs: list) -> bool:
    """Whether AOT autograd will compile this Dynamo graph with a backward."""
    return torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in example_inputs
    )


def _input_type(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return (str(a.dtype), tuple(str(d) for d in a.shape))
    return str(a) if isinstance(a, torch.SymInt) else type(a).__name__


def _has_symbolic_size(t: torch.Tensor) -> bool:
    return any(isinstance(d, torch.SymInt) for d in t.shape)


@contextlib.contextmanager
def _no_compile_cache():
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with (
        inductor_config.patch(fx_graph_cache=False),
        functorch_config.patch(enable_autograd_cache=False),
    ):
        yield


def _compile_cache_on() -> bool:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    return bool(inductor_config.fx_graph_cache or functorch_config.enable_autograd_cache)


def _compile_eager(
    gm: torch.fx.GraphModule,
    example_inputs: list,
    graph_pass: FxspPass,
    joint_patches: dict,
) -> Callable:
    """AOT autograd with Inductor's decompositions, fxsp's passes, and no codegen: for debugging.

    fxsp's passes see the graph they see under Inductor: Inductor's joint-graph passes (its no-op
    removal drops the clone an eval-mode dropout leaves, its peepholes the pointless views and
    casts) run on the joint graph when it is partitioned, or on the inference graph, then dead
    code goes, as in Inductor's post-grad passes. Their random-op replacement stays off, so
    random ops draw as in eager."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import _recursive_joint_graph_passes, partition_fn
    from torch._inductor.decomposition import select_decomp_table

    def compile_graph(
        graph_module: torch.fx.GraphModule, inputs: list, joint_passes: bool = False
    ) -> Callable:
        if joint_passes:  # an inference graph: no partitioner ran them
            graph_module = _recursive_joint_graph_passes(graph_module)
        graph_module.graph.eliminate_dead_code()
        graph_pass(graph_module.graph)
        graph_module.recompile()
        return make_boxed_func(graph_module.forward)

    def inference_graph(graph_module: torch.fx.GraphModule, inputs: list) -> Callable:
        return compile_graph(graph_module, inputs, joint_passes=True)

    compiler = aot_autograd(
        fw_compiler=compile_graph,
        bw_compiler=compile_graph,
        inference_compiler=inference_graph,
        partition_fn=partition_fn,
        decompositions=select_decomp_table(),
    )
    with inductor_config.patch(fallback_random=True, **joint_patches):
        return compiler(gm, example_inputs)


def _check_group(tp_group: Any) -> None:
    """At construction: the default group may not exist yet, but the kind of group must be right."""
    if tp_group is None or isinstance(tp_group, dist.ProcessGroup):
        return
    if _is_device_mesh(tp_group):
        if tp_group.ndim != 1:
            raise ValueError(f"tp_group must be a 1-D DeviceMesh, got {tp_group.ndim}-D")
        return
    raise TypeError(
        f"tp_group must be a ProcessGroup, a 1-D DeviceMesh or None (the default group), "
        f"not {type(tp_group).__name__}"
    )


def _is_device_mesh(value: Any) -> bool:
    return hasattr(value, "get_group") and hasattr(value, "ndim")


def _process_group(tp_group: Any) -> dist.ProcessGroup:
    if tp_group is None:
        if not dist.is_initialized():
            raise RuntimeError(
                "fxsp.backend(None) uses the default process group, which is not initialised"
            )
        return dist.group.WORLD
    return tp_group.get_group() if _is_device_mesh(tp_group) else tp_group
