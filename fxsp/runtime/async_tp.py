"""Async TP: Inductor's micro-pipeline TP over fxsp's SP graphs.

SP only pays off when the reduce-scatter after a row-parallel matmul and the all-gather before
a column-parallel one overlap with those matmuls. Micro-pipeline TP
(`torch/_inductor/fx_passes/micro_pipeline_tp.py`) does that: it turns `all_gather → mm` into
`symm_mem.fused_all_gather_matmul` and `mm → reduce_scatter` into
`symm_mem.fused_matmul_reduce_scatter` (scaled-mm forms for FP8). It needs NCCL and symmetric
memory on the TP group; fxsp's SP layout (fxsp/patterns/rows.py) keeps every site fusable.

    why_not = enable_async_tp(group_name)   # None: fuse; else a one-line reason
    with async_tp_config(post_pass):        # for fxsp's own compiles only
        compile_fx(...)
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

from ..stats import async_tp_sites


def enable_async_tp(group_name: str) -> str | None:
    """Enable symmetric memory for the group; None when micro-pipeline TP can fuse over it,
    else why not, in a few words. Where symmetric memory is already on (or mocked by
    `torch.distributed._symmetric_memory._test_mode()`), nothing else is checked but NCCL."""
    if not dist.is_available() or not dist.is_nccl_available():
        return "this torch build has no NCCL"  # micro-pipeline TP returns at once without it
    from torch.distributed import _symmetric_memory as symm_mem

    if symm_mem.is_symm_mem_enabled_for_group(group_name):
        return None
    group = dist.distributed_c10d._resolve_process_group(group_name)
    backend = dist.get_backend(group)
    if backend != "nccl":
        return f"the TP group's backend is {backend}, not NCCL"
    try:
        with warnings.catch_warnings():  # deprecated, yet what is_symm_mem_enabled_for_group reads
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group_name)
    except Exception as e:  # noqa: BLE001 - any failure means: compile without it
        return f"symmetric memory could not be enabled ({type(e).__name__}: {e})"
    return None


def fuse_now(graph: Graph) -> Any:
    """Run micro-pipeline TP on `graph` and return the coverage (for hosts that run fxsp after
    Inductor's own micro-pipeline TP, like vLLM)."""
    from torch._inductor.fx_passes.micro_pipeline_tp import micro_pipeline_tp_pass

    micro_pipeline_tp_pass(graph)
    return async_tp_sites(graph)


class AsyncTPCoverage(CustomGraphPass):
    """Inductor post-grad post pass: reads, after micro-pipeline TP ran, how many SP sites it
    fused, into the report the pre pass just made; then runs the post pass it displaced."""

    def __init__(self, pre_pass: Any, then: Any = None) -> None:
        self.pre_pass, self.then = pre_pass, then

    def __call__(self, graph: Graph) -> None:
        report = getattr(self.pre_pass, "report", None)
        if report is not None:
            report.async_tp = async_tp_sites(graph)
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> Any:
        then = self.then.uuid() if hasattr(self.then, "uuid") else repr(self.then)
        return ("fxsp.async_tp_coverage", then)


def async_tp_patches(pre_pass: Any) -> dict:
    """Inductor config patches turning micro-pipeline TP on for one compile."""
    import torch._inductor.config as inductor_config

    existing = inductor_config.post_grad_custom_post_pass
    return {"_micro_pipeline_tp": True, "post_grad_custom_post_pass": AsyncTPCoverage(pre_pass, existing)}


__all__ = ["AsyncTPCoverage", "async_tp_patches", "enable_async_tp", "fuse_now"]
