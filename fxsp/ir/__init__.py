"""fxsp's IR ops, the rules that raise model spellings to them, and their lowering."""

from .lowering import lower_ir
from .ops import ALL_REDUCE, FUSED_ADD_RMS_NORM, IR_OPS, RMS_NORM, STATIC_FP8_QUANT, fp8_max
from .raising import raise_ir, raising_passes

__all__ = [
    "ALL_REDUCE",
    "FUSED_ADD_RMS_NORM",
    "IR_OPS",
    "RMS_NORM",
    "STATIC_FP8_QUANT",
    "fp8_max",
    "lower_ir",
    "raise_ir",
    "raising_passes",
]
