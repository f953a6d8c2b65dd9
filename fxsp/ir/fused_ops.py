"""Fused IR ops: a sum all-reduce and the RMSNorm (and static FP8 quant) that reads it, as one op.

    allreduce_rms_norm(x, weight?, eps, group_name, flavor)
        -> (out, reduced)                        out = rms_norm(all_reduce(x))
    allreduce_fused_add_rms_norm(x, residual, weight?, eps, group_name, flavor)
        -> (out, residual_out)                   residual_out = all_reduce(x) + residual,
                                                 out = rms_norm(residual_out)
    allreduce_rms_norm_static_fp8_quant(x, weight?, eps, scale, fp8_dtype, group_name, flavor)
        -> (out_fp8, reduced)
    allreduce_fused_add_rms_norm_static_fp8_quant(x, residual, weight?, eps, scale, fp8_dtype,
                                                  group_name, flavor)
        -> (out_fp8, residual_out)

Arguments: the norm's (and the quant's) first, then the all-reduce's group and flavor, as in
`fxsp.all_reduce`. The second output is what the residual stream reads: the all-reduced `x` for
the plain norm (a model's first layer keeps it as its residual), the sum for the fused add. It
stays in the activation dtype; only the norm output is quantised. Returning it costs nothing:
FlashInfer's kernel writes it anyway (the plain norm runs as the fused add with a zero residual).

`fxsp/patterns/allreduce_norm.py` rewrites chains of core IR ops into these for small batches.
The reference implementation (the default everywhere, and how `lower_ir` lowers them when no
provider serves them) is exactly the chain it replaced: `ops.all_reduce_reference`, then the
norm and quant references of `ops.py`. So rewriting and lowering with the reference changes no
value.

On CUDA, FlashInfer's trtllm all-reduce fusion kernel implements them as the
`"flashinfer_allreduce"` provider, registered when FlashInfer is installed (see the end of this
file). Whether the rewrite runs at all is decided by `fxsp.runtime.fusion` (TP > 1, one pipeline
stage, SM90 / SM100 family, FlashInfer importable).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from types import ModuleType

import torch
import torch.distributed as dist
from torch.library import Library

from . import lowering
from .ops import (
    _norm_dtype,
    all_reduce_reference,
    fused_add_rms_norm_reference,
    rms_norm_reference,
    static_fp8_quant_reference,
)
from .providers import Provider, register_provider

log = logging.getLogger("fxsp")

_lib = Library("fxsp", "FRAGMENT")  # noqa: TOR901 - fxsp owns this namespace (ops.py defines it)

_lib.define("allreduce_rms_norm(Tensor x, Tensor? weight, float eps, str group_name, str flavor)"
            " -> (Tensor, Tensor)")
_lib.define("allreduce_fused_add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps,"
            " str group_name, str flavor) -> (Tensor, Tensor)")
_lib.define("allreduce_rms_norm_static_fp8_quant(Tensor x, Tensor? weight, float eps, Tensor scale,"
            " ScalarType fp8_dtype, str group_name, str flavor) -> (Tensor, Tensor)")
_lib.define("allreduce_fused_add_rms_norm_static_fp8_quant(Tensor x, Tensor residual,"
            " Tensor? weight, float eps, Tensor scale, ScalarType fp8_dtype, str group_name,"
            " str flavor) -> (Tensor, Tensor)")

Tensors = tuple[torch.Tensor, torch.Tensor]


# --- reference implementations: the unfused chain ---------------------------------------------


def allreduce_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                                 group_name: str, flavor: str) -> Tensors:
    reduced = all_reduce_reference(x, group_name, flavor)
    return rms_norm_reference(reduced, weight, eps), reduced


def allreduce_fused_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor,
                                           weight: torch.Tensor | None, eps: float,
                                           group_name: str, flavor: str) -> Tensors:
    # all_reduce(x) + residual: the rule also matches residual + all_reduce(x), which is the
    # same value (IEEE addition commutes, type promotion too).
    return fused_add_rms_norm_reference(all_reduce_reference(x, group_name, flavor), residual,
                                        weight, eps)


def allreduce_rms_norm_static_fp8_quant_reference(
        x: torch.Tensor, weight: torch.Tensor | None, eps: float, scale: torch.Tensor,
        fp8_dtype: torch.dtype, group_name: str, flavor: str) -> Tensors:
    out, reduced = allreduce_rms_norm_reference(x, weight, eps, group_name, flavor)
    return static_fp8_quant_reference(out, scale, fp8_dtype), reduced


def allreduce_fused_add_rms_norm_static_fp8_quant_reference(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
        scale: torch.Tensor, fp8_dtype: torch.dtype, group_name: str, flavor: str) -> Tensors:
    out, residual_out = allreduce_fused_add_rms_norm_reference(x, residual, weight, eps,
                                                               group_name, flavor)
    return static_fp8_quant_reference(out, scale, fp8_dtype), residual_out


_REFERENCES = {
    "allreduce_rms_norm": allreduce_rms_norm_reference,
    "allreduce_fused_add_rms_norm": allreduce_fused_add_rms_norm_reference,
    "allreduce_rms_norm_static_fp8_quant": allreduce_rms_norm_static_fp8_quant_reference,
    "allreduce_fused_add_rms_norm_static_fp8_quant":
        allreduce_fused_add_rms_norm_static_fp8_quant_reference,
}
for _name, _reference in _REFERENCES.items():
    _lib.impl(_name, _reference, "CompositeExplicitAutograd")


# --- fake implementations: shapes and dtypes only ---------------------------------------------


@torch.library.register_fake("fxsp::allreduce_rms_norm", lib=_lib)
def _allreduce_rms_norm_fake(x, weight, eps, group_name, flavor):
    return x.new_empty(x.shape, dtype=_norm_dtype(x, weight)), torch.empty_like(x)


@torch.library.register_fake("fxsp::allreduce_fused_add_rms_norm", lib=_lib)
def _allreduce_fused_add_rms_norm_fake(x, residual, weight, eps, group_name, flavor):
    residual_out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    return x.new_empty(x.shape, dtype=_norm_dtype(residual_out, weight)), residual_out


@torch.library.register_fake("fxsp::allreduce_rms_norm_static_fp8_quant", lib=_lib)
def _allreduce_rms_norm_fp8_fake(x, weight, eps, scale, fp8_dtype, group_name, flavor):
    return x.new_empty(x.shape, dtype=fp8_dtype), torch.empty_like(x)


@torch.library.register_fake("fxsp::allreduce_fused_add_rms_norm_static_fp8_quant", lib=_lib)
def _allreduce_fused_add_rms_norm_fp8_fake(x, residual, weight, eps, scale, fp8_dtype, group_name,
                                           flavor):
    residual_out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    return x.new_empty(x.shape, dtype=fp8_dtype), residual_out


fxsp = torch.ops.fxsp
ALLREDUCE_RMS_NORM = fxsp.allreduce_rms_norm.default
ALLREDUCE_FUSED_ADD_RMS_NORM = fxsp.allreduce_fused_add_rms_norm.default
ALLREDUCE_RMS_NORM_STATIC_FP8_QUANT = fxsp.allreduce_rms_norm_static_fp8_quant.default
ALLREDUCE_FUSED_ADD_RMS_NORM_STATIC_FP8_QUANT = (
    fxsp.allreduce_fused_add_rms_norm_static_fp8_quant.default)
FUSED_IR_OPS = (ALLREDUCE_RMS_NORM, ALLREDUCE_FUSED_ADD_RMS_NORM,
                ALLREDUCE_RMS_NORM_STATIC_FP8_QUANT, ALLREDUCE_FUSED_ADD_RMS_NORM_STATIC_FP8_QUANT)

for _op, _reference in zip(FUSED_IR_OPS, _REFERENCES.values(), strict=True):
    lowering.register_reference(_op, _reference)


# ---------------------------------------------------------------------------------------------
# FlashInfer's trtllm all-reduce fusion: the "flashinfer_allreduce" provider (CUDA)
# ---------------------------------------------------------------------------------------------
#
# One kernel all-reduces the rows through an IPC workspace shared by the TP peers (each GPU
# writes its rows into its peers' buffers and spin-waits on their flags), adds the residual,
# normalises and optionally quantises. The wrappers below keep the IR ops' signatures and fall
# back to the reference for every call the kernel cannot take. That choice depends only on
# shapes, dtypes and the workspace size, which are the same on every rank, so all ranks of a
# group take the same path: one rank in the kernel and another in NCCL would hang both.
#
# Numerics differ from the reference by about one rounding: the kernel sums the ranks in fp32
# and rounds once (NCCL adds in the activation dtype), multiplies by the weight before rounding
# the normalised row, and quantises as value * (1 / scale) rather than value / scale.

FLASHINFER_ALLREDUCE = "flashinfer_allreduce"
_KERNEL_DTYPES = frozenset({torch.bfloat16, torch.float16})
_KERNEL_WORLD_SIZES = (2, 4, 8)  # the TP sizes the kernel is built and measured for
DEFAULT_WORKSPACE_TOKENS = 2048
"""Rows a workspace holds where `allreduce_rms_max_tokens` has no number for the device."""


@functools.cache
def _flashinfer_comm() -> ModuleType | None:
    """`flashinfer.comm`, or None where FlashInfer is missing or fails to import."""
    try:
        import flashinfer.comm
    except Exception:  # noqa: BLE001 - a broken install (no CUDA, no cuda-python) counts as absent
        return None
    return flashinfer.comm


def flashinfer_comm_available() -> bool:
    """FlashInfer's communication module imports and a CUDA device is present."""
    return torch.cuda.is_available() and _flashinfer_comm() is not None


_workspaces: dict[tuple, tuple[int, torch.Tensor, object]] = {}


def flashinfer_workspace(group_name: str, hidden: int, dtype: torch.dtype,
                         device: torch.device) -> tuple[int, torch.Tensor]:
    """(max rows, workspace pointers) of the IPC workspace for fused all-reduces of `hidden`-wide
    `dtype` rows on `device` over the c10d group `group_name`, created on first use. It holds
    `allreduce_rms_max_tokens` rows for the device, or `DEFAULT_WORKSPACE_TOKENS`.

    Creating it is a collective over that group: every rank must call this at the same point.
    The fused ops call it on their first run (all ranks run the same graph); call it yourself
    before capturing CUDA graphs, since a rendezvous cannot be captured.
    """
    key = (group_name, hidden, dtype, device)
    if key not in _workspaces:
        from ..runtime.thresholds import allreduce_rms_max_tokens

        group = dist.distributed_c10d._resolve_process_group(group_name)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        limit = allreduce_rms_max_tokens(hidden, world, dtype, device)
        max_tokens = limit.max_tokens or DEFAULT_WORKSPACE_TOKENS
        # The rendezvous and the peer buffers belong to the TP group, never the world group
        # (FlashInfer's default when `group` is None). With pipeline stages the world holds
        # several TP groups: peers from another stage would be wired in as if they were TP
        # peers, and the kernel's GPU-side spin-wait would then wait on GPUs that run another
        # stage's graph. That is the hang of vLLM PR #43616 (seeds/003), which is also why
        # runtime.fusion keeps the fusion off when the pipeline size is above 1.
        handles, pointers = _flashinfer_comm().trtllm_create_ipc_workspace_for_all_reduce_fusion(
            rank, world, max_tokens, hidden, group=group)
        _workspaces[key] = (max_tokens, pointers, handles)  # handles keep the IPC memory alive
        log.info("fxsp: FlashInfer all-reduce workspace for group %s: %d rows x %d, %s",
                 group_name, max_tokens, hidden, dtype)
    max_tokens, pointers, _ = _workspaces[key]
    return max_tokens, pointers


def _kernel_takes(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                  flavor: str, fp8_dtype: torch.dtype | None = None) -> bool:
    """Whether the kernel computes this call; every input here is the same on every rank."""
    return (x.is_cuda and x.dtype in _KERNEL_DTYPES and x.dim() >= 1 and x.numel() > 0
            and x.shape[-1] % 8 == 0  # 16-byte vector accesses
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))
            and (weight is None or (weight.dtype == x.dtype and weight.numel() == x.shape[-1]))
            and fp8_dtype in (None, torch.float8_e4m3fn)  # the kernel writes e4m3fn only
            # vLLM's group names ("tp:0") name no c10d group: the workspace needs one.
            and flavor == "c10d" and _flashinfer_comm() is not None)


def _fused_kernel(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                  eps: float, group_name: str, scale: torch.Tensor | None = None,
                  fp8_dtype: torch.dtype | None = None) -> Tensors | None:
    """(out, residual_out) from FlashInfer, or None when the kernel cannot take the TP size or
    the rows exceed the workspace (both the same on every rank)."""
    group = dist.distributed_c10d._resolve_process_group(group_name)
    if dist.get_world_size(group) not in _KERNEL_WORLD_SIZES:
        return None
    hidden = x.shape[-1]
    rows = x.numel() // hidden
    max_tokens, pointers = flashinfer_workspace(group_name, hidden, x.dtype, x.device)
    if rows > max_tokens:
        return None
    comm = _flashinfer_comm()
    flat = x.reshape(rows, hidden).contiguous()
    # Without a residual the kernel adds zeros: residual_out is then the all-reduced x.
    residual_in = (torch.zeros_like(flat) if residual is None
                   else residual.reshape(rows, hidden).contiguous())
    residual_out = torch.empty_like(flat)
    gamma = (torch.ones(hidden, dtype=x.dtype, device=x.device) if weight is None
             else weight.contiguous())
    quantised = fp8_dtype is not None
    out = torch.empty_like(flat, dtype=fp8_dtype) if quantised else torch.empty_like(flat)
    pattern = comm.AllReduceFusionPattern
    comm.trtllm_allreduce_fusion(
        allreduce_in=flat, world_size=dist.get_world_size(group), world_rank=dist.get_rank(group),
        token_num=rows, hidden_dim=hidden, workspace_ptrs=pointers, launch_with_pdl=False,
        trigger_completion_at_end=True, fp32_acc=True,
        pattern_code=pattern.kARResidualRMSNormFP8Quant if quantised else pattern.kARResidualRMSNorm,
        use_oneshot=None, allreduce_out=None, residual_in=residual_in, residual_out=residual_out,
        norm_out=None if quantised else out, quant_out=out if quantised else None, scale_out=None,
        rms_gamma=gamma, rms_eps=eps, scale_factor=scale.float() if quantised else None,
        layout_code=None)
    return out.reshape(x.shape), residual_out.reshape(x.shape)


@torch.library.custom_op("fxsp_flashinfer::allreduce_rms_norm", mutates_args=())
def _fi_allreduce_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                           group_name: str, flavor: str) -> Tensors:
    if _kernel_takes(x, None, weight, flavor):
        fused = _fused_kernel(x, None, weight, eps, group_name)
        if fused is not None:
            return fused
    return allreduce_rms_norm_reference(x, weight, eps, group_name, flavor)


@torch.library.custom_op("fxsp_flashinfer::allreduce_fused_add_rms_norm", mutates_args=())
def _fi_allreduce_fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor,
                                     weight: torch.Tensor | None, eps: float, group_name: str,
                                     flavor: str) -> Tensors:
    if _kernel_takes(x, residual, weight, flavor):
        fused = _fused_kernel(x, residual, weight, eps, group_name)
        if fused is not None:
            return fused
    return allreduce_fused_add_rms_norm_reference(x, residual, weight, eps, group_name, flavor)


@torch.library.custom_op("fxsp_flashinfer::allreduce_rms_norm_static_fp8_quant", mutates_args=())
def _fi_allreduce_rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                               scale: torch.Tensor, fp8_dtype: torch.dtype, group_name: str,
                               flavor: str) -> Tensors:
    if _kernel_takes(x, None, weight, flavor, fp8_dtype) and scale.numel() == 1:
        fused = _fused_kernel(x, None, weight, eps, group_name, scale, fp8_dtype)
        if fused is not None:
            return fused
    return allreduce_rms_norm_static_fp8_quant_reference(x, weight, eps, scale, fp8_dtype,
                                                         group_name, flavor)


@torch.library.custom_op("fxsp_flashinfer::allreduce_fused_add_rms_norm_static_fp8_quant",
                         mutates_args=())
def _fi_allreduce_fused_add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor,
                                         weight: torch.Tensor | None, eps: float,
                                         scale: torch.Tensor, fp8_dtype: torch.dtype,
                                         group_name: str, flavor: str) -> Tensors:
    if _kernel_takes(x, residual, weight, flavor, fp8_dtype) and scale.numel() == 1:
        fused = _fused_kernel(x, residual, weight, eps, group_name, scale, fp8_dtype)
        if fused is not None:
            return fused
    return allreduce_fused_add_rms_norm_static_fp8_quant_reference(
        x, residual, weight, eps, scale, fp8_dtype, group_name, flavor)


# The IR ops' fake implementations describe the wrappers too.
for _wrapper, _fake in ((_fi_allreduce_rms_norm, _allreduce_rms_norm_fake),
                        (_fi_allreduce_fused_add_rms_norm, _allreduce_fused_add_rms_norm_fake),
                        (_fi_allreduce_rms_norm_fp8, _allreduce_rms_norm_fp8_fake),
                        (_fi_allreduce_fused_add_rms_norm_fp8,
                         _allreduce_fused_add_rms_norm_fp8_fake)):
    _wrapper.register_fake(_fake)

_fi = torch.ops.fxsp_flashinfer
FLASHINFER_ALLREDUCE_PROVIDER = Provider(
    name=FLASHINFER_ALLREDUCE,
    impls={
        ALLREDUCE_RMS_NORM: _fi.allreduce_rms_norm.default,
        ALLREDUCE_FUSED_ADD_RMS_NORM: _fi.allreduce_fused_add_rms_norm.default,
        ALLREDUCE_RMS_NORM_STATIC_FP8_QUANT: _fi.allreduce_rms_norm_static_fp8_quant.default,
        ALLREDUCE_FUSED_ADD_RMS_NORM_STATIC_FP8_QUANT:
            _fi.allreduce_fused_add_rms_norm_static_fp8_quant.default,
    },
    devices=frozenset({"cuda"}),
    dtypes=_KERNEL_DTYPES,
    priority=5,
    available=flashinfer_comm_available,
)

# Only the cheap check here: importing FlashInfer can take seconds, so that waits for the first
# `available()` (at lowering) or call.
if importlib.util.find_spec("flashinfer") is not None:
    register_provider(FLASHINFER_ALLREDUCE_PROVIDER)
