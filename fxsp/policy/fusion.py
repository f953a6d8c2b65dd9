"""Whether the fused AllReduce+RMSNorm kernel may run at all.

    allreduce_rms_fusion_gate(tp_size=2, pp_size=1, device=DeviceInfo("cuda", (9, 0)),
                              flashinfer=True)
    -> FusionGate(enabled=True, reason='...')

The fusion (`fxsp/sp/allreduce_norm.py`, FlashInfer's trtllm kernel underneath) is on only
when every condition holds, checked in this order:

1. TP size > 1: with one rank there is no all-reduce to fuse.
2. Pipeline size == 1: the kernel synchronises TP peers with a GPU-side spin-wait that assumes
   every peer launched it identically; with several pipeline stages, the TP groups of different
   stages warm up concurrently, ranks pick different launch configurations and the job hangs
   (vLLM PR #43616; gated in #35424, wrongly removed in #41458).
3. CUDA, SM90 or the SM100 family: the only devices the kernel and its size table are measured on
   (ROCm reports capability (9, 0) for gfx90a, which is not SM90).
4. FlashInfer importable (`flashinfer.comm`).

`allreduce_rms_fusion_gate` is a pure function of those facts (tests describe an H100 on a CPU);
`fxsp.compile.options.decide_allreduce_rms_fusion` collects them from this machine and logs the
reason when the fusion is off. How many rows the fusion may take is a separate question:
`thresholds.allreduce_rms_max_tokens`.
"""

from __future__ import annotations

from typing import NamedTuple

from .thresholds import DeviceInfo


class FusionGate(NamedTuple):
    """`enabled`, and `reason`: what held, or the first condition that failed."""

    enabled: bool
    reason: str


def allreduce_rms_fusion_gate(
    tp_size: int, pp_size: int, device: DeviceInfo, flashinfer: bool
) -> FusionGate:
    """Whether AllReduce+RMSNorm fusion may run, from plain facts: TP and pipeline sizes, the
    device, and whether `flashinfer.comm` imports. See the module docstring for why each."""
    if tp_size <= 1:
        return FusionGate(False, f"tp_size={tp_size}: no all-reduce to fuse (needs TP > 1)")
    if pp_size != 1:
        return FusionGate(
            False,
            (
                f"pipeline_parallel_size={pp_size}: the fused kernel deadlocks with more than one "
                "pipeline stage (TP groups warming up concurrently pick divergent launch configs)"
            ),
        )
    if device.kind != "cuda" or device.capability is None:
        return FusionGate(False, f"device {device.label} is not CUDA (needs SM90 or SM100 family)")
    if not (device.capability == (9, 0) or device.capability[0] == 10):
        return FusionGate(False, f"device {device.label} is not SM90 or the SM100 family")
    if not flashinfer:
        return FusionGate(False, "FlashInfer is not importable (flashinfer.comm)")
    return FusionGate(True, f"tp_size={tp_size}, one pipeline stage, {device.label}, FlashInfer")
