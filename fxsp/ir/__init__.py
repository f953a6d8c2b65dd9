"""fxsp's IR ops, the rules that raise model spellings to them, and their lowering."""

from .ops import ALL_REDUCE, FUSED_ADD_RMS_NORM, IR_OPS, RMS_NORM, STATIC_FP8_QUANT, fp8_max

__all__ = ["ALL_REDUCE", "FUSED_ADD_RMS_NORM", "IR_OPS", "RMS_NORM", "STATIC_FP8_QUANT", "fp8_max"]
