"""Async TP: Inductor's micro-pipeline TP over fxsp's SP graphs.

SP only pays off when the reduce-scatter after a row-parallel matmul and the all-gather before
a column-parallel one overlap with those matmuls. Micro-pipeline TP
(`torch/_inductor/fx_passes/micro_pipeline_tp.py`) does that: it turns `all_gather → mm` into
`symm_mem.fused_all_gather_matmul` and `mm → reduce_scatter` into
`symm_mem.fused_matmul_reduce_scatter` (scaled-mm forms for FP8). It needs NCCL and symmetric
memory on the TP group; fxsp's SP layout (fxsp/sp/rows.py) keeps every site fusable.

    why_not = enable_async_tp(group_name)   # None: fuse; else a one-line reason
    compile_fx(..., config_patches={**async_tp_patches(pre_pass), ...})   # fxsp's compiles only
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

from .stats import async_tp_sites


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


def micro_pipeline_tp(graph: Graph) -> None:
    """Inductor's micro-pipeline TP, with the reduce-scatters looked up after the all-gathers
    are fused. Inductor's own pass finds both up front, so where one matmul sits between an
    all-gather and a reduce-scatter (`all_gather → mm → reduce_scatter`, what SP makes of a
    norm feeding one row-parallel matmul) it fuses the all-gather with the matmul, then tries
    the reduce-scatter's stale match on the erased matmul and fails (AttributeError)."""
    from torch._inductor import config
    from torch._inductor.fx_passes import micro_pipeline_tp as mptp

    def exposed(collectives: list, node_of) -> list:
        if not config.reorder_for_compute_comm_overlap:  # Inductor's own filter, when it applies
            return collectives
        hidden = mptp._get_unexposed_collectives(graph)
        return [c for c in collectives if node_of(c) not in hidden]

    for all_gather in exposed(mptp.find_all_gather_patterns(graph), lambda c: c.ag_node):
        mptp.fuse_all_gather_matmul(all_gather)
    for reduce_scatter in exposed(
        mptp.find_reduce_scatter_patterns(graph), lambda c: c.reduce_scatter_node
    ):
        # The output of a fused all-gather + matmul carries no meta["val"], which the fusion
        # reads first; it is no matmul's output anyway.
        if "val" in reduce_scatter.input_node.meta:
            mptp.fuse_matmul_reduce_scatter(reduce_scatter)


def fuse_now(graph: Graph) -> Any:
    """Run micro-pipeline TP on `graph` and return the coverage. DTensor's sequence-sharded
    collectives (training graphs, hand-written SP plans) are first laid out as it fuses them."""
    from ..training.fusable_layout import lay_out_for_fusion

    lay_out_for_fusion(graph)
    micro_pipeline_tp(graph)
    _fill_values(graph)
    return async_tp_sites(graph)


def _fill_values(graph: Graph) -> None:
    """Give the nodes the fusion made their meta["val"]: it leaves the fused ops' outputs
    without one, and later passes read it (vLLM lowers its IR ops from their inputs' values)."""
    from ..dsl.fake import fake_value

    for node in graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            val = fake_value(node.target, node.args, node.kwargs)
            if val is not None:
                node.meta["val"] = val


class AsyncTPFusion(CustomGraphPass):
    """Inductor post-grad post pass: micro-pipeline TP (`micro_pipeline_tp`, in the place
    Inductor's own would run), then its coverage into the report the pre pass just made; then
    the post pass it displaced."""

    def __init__(self, pre_pass: Any, then: Any = None) -> None:
        self.pre_pass, self.then = pre_pass, then

    def __call__(self, graph: Graph) -> None:
        sites = fuse_now(graph)
        report = getattr(self.pre_pass, "report", None)
        if report is not None:
            report.async_tp = sites
            if getattr(self.pre_pass, "compiled", False):  # a lazy backward: saved again with it
                self.pre_pass.save()
        if self.then is not None:
            self.then(graph)

    def uuid(self) -> Any:
        then = self.then.uuid() if hasattr(self.then, "uuid") else repr(self.then)
        return ("fxsp.async_tp_fusion", then)


def async_tp_patches(pre_pass: Any) -> dict:
    """Inductor config patches for one compile: fxsp's micro-pipeline TP in the post pass, and
    Inductor's own off (it would fail first on `all_gather → mm → reduce_scatter`)."""
    import torch._inductor.config as inductor_config

    existing = inductor_config.post_grad_custom_post_pass
    return {
        "_micro_pipeline_tp": False,
        "post_grad_custom_post_pass": AsyncTPFusion(pre_pass, existing),
    }


__all__ = ["AsyncTPFusion", "async_tp_patches", "enable_async_tp", "fuse_now", "micro_pipeline_tp"]
