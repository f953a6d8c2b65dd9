"""`fxsp.backend(tp_group)`: a torch.compile backend that makes TP models sequence-parallel.

    torch.compile(model, backend=fxsp.backend(tp_group))

Dynamo graph → AOT autograd → post-grad ATen graph → fxsp's pipeline (raise → SP rules →
clean up → lower) → Inductor codegen. The pipeline runs as Inductor's post-grad *pre* pass:
Inductor's own passes, micro-pipeline TP among them, run after it and so see the new
reduce-scatter / all-gather and can fuse them with the neighbouring matmuls.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .patterns.allreduce_norm import AllReduceNormConfig
from .patterns.sp import SPConfig
from .pipeline import GraphReport, run_pipeline
from .runtime.fusion import decide_allreduce_rms_fusion
from .runtime.guard import RankGuard, fingerprint, graph_structure

log = logging.getLogger("fxsp")


@dataclass(frozen=True)
class Options:
    """Backend options; every one is part of the compiled graph's cache key."""

    min_tokens: int | str = "auto"  # SP only for rows >= min_tokens; "auto": see runtime.thresholds
    fp8: bool = True  # the FP8 SP rules (all-gather FP8 bytes)
    inner: str = "inductor"  # "inductor", or "eager": run the rewritten ATen graph without codegen
    explain: bool = False  # log every rule's best near-miss at INFO
    check_ranks: bool = True  # compare rewrite fingerprints across ranks before a graph's first run
    batch_invariant: bool = False  # results independent of batch size: no SP (see Backend)
    shard_outputs: bool = False  # outputs fxsp gathered stay sharded: see runtime.gather_rows
    inductor_reuse_patch: bool = True  # torch 2.11 only: runtime.inductor_reuse's cost model
    allreduce_fusion: bool = True  # fused all-reduce + RMSNorm below the SP threshold, where allowed
    pipeline_size: int = 1  # pipeline stages; the fused all-reduce is off above 1 (it deadlocks)


def backend(tp_group: Any = None, **options: Any) -> Backend:
    """A torch.compile backend applying sequence parallelism over `tp_group`.

    `tp_group`: a ProcessGroup, a 1-D DeviceMesh, or None for the default group.
    Options: see `Options`.
    """
    return Backend(tp_group, Options(**options))


def _traced_floats(gm: torch.fx.GraphModule) -> list[str]:
    """Sources of the graph inputs that Dynamo made of Python floats (passed as 0-d tensors)."""
    names = []
    for node in gm.graph.find_nodes(op="placeholder"):
        arg = node.meta.get("grapharg")
        if arg is not None and arg.pass_arg_as_tensor and arg.fake_tensor is not None \
                and arg.fake_tensor.dtype.is_floating_point:
            name = arg.source.name
            names.append(name() if callable(name) else name)  # a method before torch 2.13
    return names


class Backend:
    def __init__(self, tp_group: Any, options: Options) -> None:
        if options.inner not in ("inductor", "eager"):
            raise ValueError(f"inner must be 'inductor' or 'eager', not {options.inner!r}")
        self.tp_group = tp_group
        self.options = options
        self.reports: list[GraphReport] = []
        self._said_off = False
        self._floats_named: set[str] = set()
        self._fusion: tuple | None = None  # (config or None,) once decided

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        sp = self.sp_config()
        if sp is not None:
            self._name_traced_floats(gm)
        seen = len(self.reports)
        compiled = self._compile_variants(gm, example_inputs, sp)
        if sp is None or not self.options.check_ranks:
            return compiled
        facts = fingerprint(_source_digest(), asdict(self.options), {**asdict(sp), "rank": None},
                            graph_structure(gm), [_input_type(a) for a in example_inputs])
        new = self.reports[seen:]
        decisions = fingerprint([(r.counts, r.collectives) for r in new]) if new else 0
        return RankGuard(compiled, self._group, facts, decisions, what=f"graph {seen}")

    def _name_traced_floats(self, gm: torch.fx.GraphModule) -> None:
        """Say once which Python floats Dynamo made graph inputs: a norm whose eps is one has no
        constant eps to match, so it silently stays as it is otherwise."""
        new = [name for name in _traced_floats(gm) if name not in self._floats_named]
        if new:
            self._floats_named.update(new)
            log.warning("fxsp: Dynamo traced Python floats as graph inputs (%s); a norm whose eps is "
                        "one is not rewritten. torch.compile(dynamic=True) does this: set "
                        "torch._dynamo.config.specialize_float = True, or mark the token dims with "
                        "torch._dynamo.mark_dynamic instead.", ", ".join(new))

    def _compile_variants(self, gm: torch.fx.GraphModule, example_inputs: list, sp: SPConfig | None) -> Callable:
        if sp is None or not self._may_dispatch(example_inputs):
            return self._compile(gm, example_inputs, sp)
        # Symbolic rows: the SP variant's graph cannot know whether a batch reaches min_tokens,
        # so a non-SP variant is compiled beside it and each call picks one by its row count.
        plain_gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        seen = len(self.reports)
        with _no_compile_cache():  # the row thresholds are read off the pass: it must run
            with_sp = self._compile(gm, example_inputs, replace(sp, dispatch=True))
        thresholds = [t for r in self.reports[seen:] for t in r.row_thresholds]
        if not thresholds:
            return with_sp
        with _no_compile_cache():
            without_sp = self._compile(plain_gm, example_inputs, None)
        return RowDispatch(with_sp, without_sp, thresholds, example_inputs)

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: list, sp: SPConfig | None) -> Callable:
        _register_pass()
        graph_pass = FxspPass(self, sp, self.fusion_config())
        if self.options.inner == "eager":
            return _compile_eager(gm, example_inputs, graph_pass)
        from torch._inductor.compile_fx import compile_fx

        from .runtime.inductor_reuse import install as install_reuse_patch

        install_reuse_patch(enabled=self.options.inductor_reuse_patch)  # a no-op off torch 2.11

        return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": graph_pass})

    def _may_dispatch(self, example_inputs: list) -> bool:
        """Symbolic sizes and a threshold that may be above zero."""
        symbolic = any(isinstance(a, torch.SymInt) or (isinstance(a, torch.Tensor) and _has_symbolic_size(a))
                       for a in example_inputs)
        if not symbolic or self.options.min_tokens == 0:
            return False
        if self.options.min_tokens == "auto":  # 0 off CUDA: see runtime.thresholds
            return any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in example_inputs)
        return True

    def sp_config(self) -> SPConfig | None:
        """The SP settings for this process, or None when TP size is 1 (nothing to rewrite)."""
        group = self._group = _process_group(self.tp_group)
        world = dist.get_world_size(group)
        if world == 1 or self.options.batch_invariant:
            if not self._said_off:
                log.info("fxsp: %s", "TP size 1, sequence parallelism has nothing to do" if world == 1 else
                         "batch_invariant: sequence parallelism is off (a reduce-scatter sums in another "
                         "order than an all-reduce, so results would depend on the batch)")
                self._said_off = True
            return None
        return SPConfig(group=group.group_name, world=world, rank=dist.get_rank(group),
                        min_tokens=self.options.min_tokens, fp8=self.options.fp8,
                        shard_outputs=self.options.shard_outputs)


    def fusion_config(self) -> AllReduceNormConfig | None:
        """The fused all-reduce + RMSNorm settings, or None where runtime.fusion rules it out
        (it logs why, once per backend)."""
        if self._fusion is None:
            group = _process_group(self.tp_group)
            world = dist.get_world_size(group)
            # batch_invariant: the kernel's summation order depends on the rows.
            wanted = self.options.allreduce_fusion and not self.options.batch_invariant and world > 1
            allowed = wanted and decide_allreduce_rms_fusion(world, self.options.pipeline_size).enabled
            config = AllReduceNormConfig(group=group.group_name, world=world, fp8=self.options.fp8)
            self._fusion = (config if allowed else None,)
        return self._fusion[0]


def _register_pass() -> None:
    """Make FxspPass an Inductor CustomGraphPass (what Inductor's cache key asks for), here
    rather than at import: importing Inductor takes a second that `import fxsp` should not."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    CustomGraphPass.register(FxspPass)


class FxspPass:
    """fxsp's pipeline as an Inductor post-grad pass (a CustomGraphPass: `_register_pass`). Its
    uuid covers fxsp's source, the options and the TP group *and rank*: the rewritten graph holds
    rank-specific slice offsets, while Inductor's cache key is otherwise the same on every rank."""

    def __init__(self, owner: Backend, sp: SPConfig | None, fusion: AllReduceNormConfig | None = None) -> None:
        self.owner, self.sp, self.fusion = owner, sp, fusion

    def __call__(self, graph: torch.fx.Graph) -> None:
        report = run_pipeline(graph, self.sp, explain=self.owner.options.explain, fusion=self.fusion)
        self.owner.reports.append(report)

    def uuid(self) -> str:
        parts = (_source_digest(), asdict(self.owner.options), asdict(self.sp) if self.sp else None,
                 asdict(self.fusion) if self.fusion else None)
        return hashlib.sha256(repr(parts).encode()).hexdigest()


class RowDispatch:
    """Calls the SP variant when every rewritten site's row count reaches its threshold, the
    non-SP variant otherwise. Row counts are symbolic expressions over the graph's input sizes;
    every rank sees the same sizes, so every rank picks the same variant."""

    def __init__(self, with_sp: Callable, without_sp: Callable, thresholds: list, example_inputs: list) -> None:
        self.with_sp, self.without_sp, self.thresholds = with_sp, without_sp, thresholds
        self.sources: dict = {}  # sympy symbol -> (input index, dim or None for an int input)
        for i, a in enumerate(example_inputs):
            sizes = [(None, a)] if isinstance(a, torch.SymInt) else (
                list(enumerate(a.shape)) if isinstance(a, torch.Tensor) else [])
            for dim, size in sizes:
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    self.sources.setdefault(size.node.expr, (i, dim))

    def use_sp(self, args: tuple) -> bool:
        import sympy  # here: `import fxsp` should not import it

        values = {sym: sympy.Integer(args[i] if dim is None else args[i].shape[dim])
                  for sym, (i, dim) in self.sources.items()}
        for rows, need in self.thresholds:
            value = rows.xreplace(values)
            if not value.is_number or int(value) < need:  # unknown: the safe, non-SP variant
                return False
        return True

    def __call__(self, *args: Any) -> Any:
        return (self.with_sp if self.use_sp(args) else self.without_sp)(*args)


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

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def _compile_eager(gm: torch.fx.GraphModule, example_inputs: list, graph_pass: FxspPass) -> Callable:
    """AOT autograd with Inductor's decompositions, the pipeline, and no codegen: for debugging."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def forward(fw: torch.fx.GraphModule, inputs: list) -> Callable:
        graph_pass(fw.graph)
        fw.recompile()
        return make_boxed_func(fw.forward)

    return aot_autograd(fw_compiler=forward, decompositions=select_decomp_table())(gm, example_inputs)


def _process_group(tp_group: Any) -> dist.ProcessGroup:
    if tp_group is None:
        if not dist.is_initialized():
            raise RuntimeError("fxsp.backend(None) uses the default process group, which is not initialised")
        return dist.group.WORLD
    if isinstance(tp_group, dist.ProcessGroup):
        return tp_group
    if hasattr(tp_group, "get_group") and hasattr(tp_group, "ndim"):  # DeviceMesh
        if tp_group.ndim != 1:
            raise ValueError(f"tp_group must be a 1-D DeviceMesh, got {tp_group.ndim}-D")
        return tp_group.get_group()
    raise TypeError(f"tp_group must be a ProcessGroup, a 1-D DeviceMesh or None, not {type(tp_group).__name__}")


_digest: str | None = None


def _source_digest() -> str:
    """Hash of fxsp's own source: a changed rule must never hit a stale cache entry."""
    global _digest
    if _digest is None:
        h = hashlib.sha256()
        for path in sorted(Path(__file__).parent.rglob("*.py")):
            h.update(path.read_bytes())
        _digest = h.hexdigest()
    return _digest
