"""What is decided or patched at run time: token thresholds, the rank-consistency guard, the
choice between SP and non-SP variants per batch (row_dispatch), pipeline-stage boundaries and
Inductor's reuse heuristic."""

from .guard import RankMismatchError
from .inductor_reuse import install as install_inductor_reuse_patch
from .inductor_reuse import is_installed as inductor_reuse_patch_installed
from .inductor_reuse import should_realize
from .inductor_reuse import uninstall as uninstall_inductor_reuse_patch
from .pipeline_parallel import gather_rows, padded_block_rows
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
    "FusionLimit",
    "RankMismatchError",
    "SPThreshold",
    "allreduce_rms_max_tokens",
    "device_info",
    "gather_rows",
    "inductor_reuse_patch_installed",
    "install_inductor_reuse_patch",
    "padded_block_rows",
    "should_realize",
    "sp_min_tokens",
    "thresholds_markdown",
    "uninstall_inductor_reuse_patch",
]
