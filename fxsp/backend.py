"""`fxsp.backend(tp_group)`: a torch.compile backend that makes TP models sequence-parallel.

    torch.compile(model, backend=fxsp.backend(tp_group))

Dynamo graph → AOT autograd → post-grad ATen graph → fxsp's pipeline (raise → SP rules →
clean up → lower) → Inductor codegen. The pipeline runs as Inductor's post-grad *pre* pass:
Inductor's own passes, micro-pipeline TP among them, run after it and so see the new
reduce-scatter / all-gather and can fuse them with the neighbouring matmuls.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch._inductor.custom_graph_pass import CustomGraphPass

from .pipeline import GraphReport, run_pipeline
from .patterns.sp import SPConfig

log = logging.getLogger("fxsp")


@dataclass(frozen=True)
class Options:
    """Backend options; every one is part of the compiled graph's cache key."""

    min_tokens: int | str = "auto"  # SP only for rows >= min_tokens; "auto": see runtime.thresholds
    fp8: bool = True  # the FP8 SP rules (all-gather FP8 bytes)
    inner: str = "inductor"  # "inductor", or "eager": run the rewritten ATen graph without codegen
    explain: bool = False  # log every rule's best near-miss at INFO


def backend(tp_group: Any = None, **options: Any) -> "Backend":
    """A torch.compile backend applying sequence parallelism over `tp_group`.

    `tp_group`: a ProcessGroup, a 1-D DeviceMesh, or None for the default group.
    Options: see `Options`.
    """
    return Backend(tp_group, Options(**options))


class Backend:
    def __init__(self, tp_group: Any, options: Options) -> None:
        if options.inner not in ("inductor", "eager"):
            raise ValueError(f"inner must be 'inductor' or 'eager', not {options.inner!r}")
        self.tp_group = tp_group
        self.options = options
        self.reports: list[GraphReport] = []
        self._said_tp1 = False

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        sp = self.sp_config(example_inputs)
        graph_pass = FxspPass(self, sp)
        if self.options.inner == "eager":
            return _compile_eager(gm, example_inputs, graph_pass)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": graph_pass})

    def sp_config(self, example_inputs: list | None = None) -> SPConfig | None:
        """The SP settings for this process, or None when TP size is 1 (nothing to rewrite)."""
        group = _process_group(self.tp_group)
        world = dist.get_world_size(group)
        if world == 1:
            if not self._said_tp1:
                log.info("fxsp: TP size 1, sequence parallelism has nothing to do")
                self._said_tp1 = True
            return None
        return SPConfig(group=group.group_name, world=world, rank=dist.get_rank(group),
                        min_tokens=self._min_tokens(example_inputs, world), fp8=self.options.fp8)

    def _min_tokens(self, example_inputs: list | None, world: int) -> int:
        if self.options.min_tokens != "auto":
            return int(self.options.min_tokens)
        from .runtime.thresholds import auto_min_tokens

        return auto_min_tokens(example_inputs or [], world)


class FxspPass(CustomGraphPass):
    """fxsp's pipeline as an Inductor post-grad pass. Its uuid covers fxsp's source, the options
    and the TP group *and rank*: the rewritten graph holds rank-specific slice offsets, while
    Inductor's cache key is otherwise the same on every rank."""

    def __init__(self, owner: Backend, sp: SPConfig | None) -> None:
        self.owner, self.sp = owner, sp

    def __call__(self, graph: torch.fx.Graph) -> None:
        report = run_pipeline(graph, self.sp, explain=self.owner.options.explain)
        self.owner.reports.append(report)

    def uuid(self) -> str:
        parts = (_source_digest(), asdict(self.owner.options), asdict(self.sp) if self.sp else None)
        return hashlib.sha256(repr(parts).encode()).hexdigest()


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
