"""Async TP coverage without GPUs: compile with micro-pipeline TP as on NCCL, read what it fused.

Micro-pipeline TP only fuses where NCCL exists and symmetric memory is on for the group. On a
CPU build under the fake process group, `mocked_symmetric_memory()` makes both true (the test
mode of `torch.distributed._symmetric_memory`), so Inductor runs the real fusion pass; the fused
`symm_mem` ops have no CPU kernels, so it lends them torch's reference implementations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
import torch.distributed as dist

import fxsp

_FUSED_OPS = (
    "fused_all_gather_matmul",
    "fused_all_gather_scaled_matmul",
    "fused_matmul_reduce_scatter",
    "fused_scaled_matmul_reduce_scatter",
)


@contextlib.contextmanager
def mocked_symmetric_memory() -> Iterator[None]:
    """NCCL and symmetric memory as micro-pipeline TP sees them, and CPU kernels for the fused
    ops: torch's own reference implementations (functional collectives, then matmuls)."""
    import torch.distributed._symmetric_memory as symm_mem

    lib = torch.library.Library("symm_mem", "IMPL")
    for name in _FUSED_OPS:
        lib.impl(name, getattr(symm_mem, f"_{name}_fallback"), "CPU")
    try:
        with symm_mem._test_mode(), mock.patch.object(dist, "is_nccl_available", lambda: True):
            yield
    finally:
        lib._destroy()


def compile_for_coverage(
    model: torch.nn.Module, inputs: torch.Tensor, dynamic: bool = False, tp_group=None, **options
) -> list:
    """Compile `model` with `fxsp.backend(async_tp=True)` and return one report per graph,
    `report.async_tp` holding its fusable and fused sites."""
    backend = fxsp.backend(tp_group, async_tp=True, **{"min_tokens": 0, **options})
    if dynamic:
        torch._dynamo.mark_dynamic(inputs, 0)
    torch._dynamo.reset()
    with mocked_symmetric_memory(), torch.no_grad():
        torch.compile(model, backend=backend)(inputs)
    return backend.reports


def totals(reports: list) -> tuple[int, int]:
    """(fusable, fused) summed over a compile's graphs."""
    sites = [r.async_tp for r in reports if r.async_tp is not None]
    return sum(s.fusable for s in sites), sum(s.fused for s in sites)
