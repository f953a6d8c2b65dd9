"""When a rewrite pays or may run: token thresholds for SP and the fused all-reduce + RMSNorm
(`thresholds.py`, whose tables docs/thresholds.md shows) and the fused kernel's gate
(`fusion.py`). Pure functions of rank-independent facts: every rank decides alike."""

from .fusion import FusionGate, allreduce_rms_fusion_gate
from .thresholds import (
    DeviceInfo,
    FusionLimit,
    SPThreshold,
    allreduce_rms_max_tokens,
    device_info,
    sp_min_tokens,
    thresholds_markdown,
)

__all__ = [
    "DeviceInfo",
    "FusionGate",
    "FusionLimit",
    "SPThreshold",
    "allreduce_rms_fusion_gate",
    "allreduce_rms_max_tokens",
    "device_info",
    "sp_min_tokens",
    "thresholds_markdown",
]
