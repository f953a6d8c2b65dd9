"""FlashInfer's kernels as fxsp providers (CUDA): RMSNorm, and the all-reduce + RMSNorm fusion.

- `"flashinfer"`: `fxsp_flashinfer::rms_norm` and `fxsp_flashinfer::fused_add_rms_norm`, with
  the signatures of the IR ops `rms_norm` / `fused_add_rms_norm`, priority 5 (below Triton's 10:
  fxsp's own kernels round exactly like the reference, FlashInfer does not). Registered by
  `kernels.load_gpu_providers()` when FlashInfer is installed.
- `"flashinfer_allreduce"`: the trtllm all-reduce fusion kernel for the fused IR ops of
  `fused_ops.py`, and the IPC workspace it needs. Registered on import when FlashInfer is
  installed.

FlashInfer's kernels take bf16/fp16 rows with a weight of the same dtype, and its
`fused_add_rmsnorm` works in place. The wrappers make them functional by cloning, supply a
weight of ones when there is none, and fall back to the reference for calls FlashInfer cannot
take (other dtypes, a weight of another dtype), so the ops are correct for every input.

Numerics: FlashInfer multiplies by the weight before rounding the normalised row, where the
reference rounds to the input dtype first; results may differ from the reference by one
rounding (one ulp of bf16/fp16).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from types import ModuleType

import torch
import torch.distributed as dist

from ..fused_ops import FUSED_IR_OPS, REFERENCES, Tensors, arguments, fake
from ..ops import (
    FUSED_ADD_RMS_NORM,
    RMS_NORM,
    _fused_add_rms_norm_fake,
    _rms_norm_fake,
    fused_add_rms_norm_reference,
    rms_norm_reference,
)
from ..providers import Provider, register_provider

log = logging.getLogger("fxsp")

_DTYPES = frozenset({torch.bfloat16, torch.float16})  # what every FlashInfer kernel here takes


@functools.cache
def _flashinfer(part: str) -> ModuleType | None:
    """`flashinfer.<part>` ("norm", "comm"), or None where FlashInfer is missing or broken."""
    try:
        return importlib.import_module(f"flashinfer.{part}")
    except Exception:  # noqa: BLE001 - a broken install (no CUDA, no cuda-python) counts as absent
        return None


def flashinfer_installed() -> bool:
    """FlashInfer is installed (checked without importing it)."""
    return importlib.util.find_spec("flashinfer") is not None


def flashinfer_available(part: str = "norm") -> bool:
    """`flashinfer.<part>` imports and a CUDA device is present."""
    return torch.cuda.is_available() and _flashinfer(part) is not None


# ---------------------------------------------------------------------------------------------
# RMSNorm: the "flashinfer" provider
# ---------------------------------------------------------------------------------------------


def _takes(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether FlashInfer's kernels can compute this call."""
    return (
        x.is_cuda
        and x.dtype in _DTYPES
        and x.numel() > 0
        and (weight is None or weight.dtype == x.dtype)
        and _flashinfer("norm") is not None
    )


def _weight_or_ones(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    # Multiplying by ones in fp32 changes nothing, so this is the unweighted norm.
    return torch.ones(x.shape[-1], dtype=x.dtype, device=x.device) if weight is None else weight


@torch.library.custom_op("fxsp_flashinfer::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if not _takes(x, weight):
        return rms_norm_reference(x, weight, eps)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = _flashinfer("norm").rmsnorm(rows, _weight_or_ones(x, weight).contiguous(), eps)
    return out.reshape(x.shape)


@torch.library.custom_op("fxsp_flashinfer::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _takes(x, weight) or residual.dtype != x.dtype or residual.shape != x.shape:
        return fused_add_rms_norm_reference(x, residual, weight, eps)
    # FlashInfer writes the norm into its input and the sum into its residual: give it copies.
    out = x.reshape(-1, x.shape[-1]).clone()
    residual_out = residual.reshape(-1, x.shape[-1]).clone()
    _flashinfer("norm").fused_add_rmsnorm(
        out, residual_out, _weight_or_ones(x, weight).contiguous(), eps
    )
    return out.reshape(x.shape), residual_out.reshape(x.shape)


rms_norm.register_fake(_rms_norm_fake)
fused_add_rms_norm.register_fake(_fused_add_rms_norm_fake)

_ops = torch.ops.fxsp_flashinfer
FLASHINFER_PROVIDER = Provider(
    name="flashinfer",
    impls={RMS_NORM: _ops.rms_norm.default, FUSED_ADD_RMS_NORM: _ops.fused_add_rms_norm.default},
    devices=frozenset({"cuda"}),
    dtypes=_DTYPES,
    priority=5,
    available=flashinfer_available,
)


# ---------------------------------------------------------------------------------------------
# All-reduce + RMSNorm (+ FP8 quant): the "flashinfer_allreduce" provider
# ---------------------------------------------------------------------------------------------

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
_KERNEL_WORLD_SIZES = (2, 4, 8)  # the TP sizes the kernel is built and measured for
DEFAULT_WORKSPACE_TOKENS = 2048
"""Rows a workspace holds where `allreduce_rms_max_tokens` has no number for the device."""


_workspaces: dict[tuple, tuple[int, torch.Tensor, object]] = {}


def flashinfer_workspace(
    group_name: str, hidden: int, dtype: torch.dtype, device: torch.device
) -> tuple[int, torch.Tensor]:
    """(max rows, workspace pointers) of the IPC workspace for fused all-reduces of `hidden`-wide
    `dtype` rows on `device` over the c10d group `group_name`, created on first use. It holds
    `allreduce_rms_max_tokens` rows for the device, or `DEFAULT_WORKSPACE_TOKENS`.

    Creating it is a collective over that group: every rank must call this at the same point.
    The fused ops call it on their first run (all ranks run the same graph); call it yourself
    before capturing CUDA graphs, since a rendezvous cannot be captured.
    """
    key = (group_name, hidden, dtype, device)
    if key not in _workspaces:
        from ...policy.thresholds import allreduce_rms_max_tokens

        group = dist.distributed_c10d._resolve_process_group(group_name)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        limit = allreduce_rms_max_tokens(hidden, world, dtype, device)
        max_tokens = limit.max_tokens or DEFAULT_WORKSPACE_TOKENS
        # The rendezvous and the peer buffers belong to the TP group, never the world group
        # (FlashInfer's default when `group` is None). With pipeline stages the world holds
        # several TP groups: peers from another stage would be wired in as if they were TP
        # peers, and the kernel's GPU-side spin-wait would then wait on GPUs that run another
        # stage's graph. That is the hang of vLLM PR #43616, which is also why
        # policy.fusion keeps the fusion off when the pipeline size is above 1.
        handles, pointers = _flashinfer("comm").trtllm_create_ipc_workspace_for_all_reduce_fusion(
            rank, world, max_tokens, hidden, group=group
        )
        _workspaces[key] = (max_tokens, pointers, handles)  # handles keep the IPC memory alive
        log.info(
            "fxsp: FlashInfer all-reduce workspace for group %s: %d rows x %d, %s",
            group_name,
            max_tokens,
            hidden,
            dtype,
        )
    max_tokens, pointers, _ = _workspaces[key]
    return max_tokens, pointers


def _kernel_takes(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    flavor: str,
    fp8_dtype: torch.dtype | None = None,
) -> bool:
    """Whether the kernel computes this call; every input here is the same on every rank."""
    return (
        x.is_cuda
        and x.dtype in _DTYPES
        and x.dim() >= 1
        and x.numel() > 0
        and x.shape[-1] % 8 == 0  # 16-byte vector accesses
        and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))
        and (weight is None or (weight.dtype == x.dtype and weight.numel() == x.shape[-1]))
        and fp8_dtype in (None, torch.float8_e4m3fn)  # the kernel writes e4m3fn only
        # vLLM's group names ("tp:0") name no c10d group: the workspace needs one.
        and flavor == "c10d"
        and _flashinfer("comm") is not None
    )


def _fused_kernel(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    group_name: str,
    scale: torch.Tensor | None = None,
    fp8_dtype: torch.dtype | None = None,
) -> Tensors | None:
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
    comm = _flashinfer("comm")
    flat = x.reshape(rows, hidden).contiguous()
    # Without a residual the kernel adds zeros: residual_out is then the all-reduced x.
    residual_in = (
        torch.zeros_like(flat) if residual is None else residual.reshape(rows, hidden).contiguous()
    )
    residual_out = torch.empty_like(flat)
    gamma = (
        torch.ones(hidden, dtype=x.dtype, device=x.device)
        if weight is None
        else weight.contiguous()
    )
    quantised = fp8_dtype is not None
    out = torch.empty_like(flat, dtype=fp8_dtype) if quantised else torch.empty_like(flat)
    pattern = comm.AllReduceFusionPattern
    comm.trtllm_allreduce_fusion(
        allreduce_in=flat,
        world_size=dist.get_world_size(group),
        world_rank=dist.get_rank(group),
        token_num=rows,
        hidden_dim=hidden,
        workspace_ptrs=pointers,
        launch_with_pdl=False,
        trigger_completion_at_end=True,
        fp32_acc=True,
        pattern_code=pattern.kARResidualRMSNormFP8Quant
        if quantised
        else pattern.kARResidualRMSNorm,
        use_oneshot=None,
        allreduce_out=None,
        residual_in=residual_in,
        residual_out=residual_out,
        norm_out=None if quantised else out,
        quant_out=out if quantised else None,
        scale_out=None,
        rms_gamma=gamma,
        rms_eps=eps,
        scale_factor=scale.float() if quantised else None,
        layout_code=None,
    )
    return out.reshape(x.shape), residual_out.reshape(x.shape)


def _kernel_or_reference(op: torch._ops.OpOverload, *args) -> Tensors:
    """`op(*args)` from the kernel where it takes the call, else from the reference."""
    a = arguments(op, args)
    x, residual, weight = a["x"], a.get("residual"), a["weight"]
    scale, fp8_dtype = a.get("scale"), a.get("fp8_dtype")
    if _kernel_takes(x, residual, weight, a["flavor"], fp8_dtype) and (
        scale is None or scale.numel() == 1
    ):
        fused = _fused_kernel(x, residual, weight, a["eps"], a["group_name"], scale, fp8_dtype)
        if fused is not None:
            return fused
    return REFERENCES[op](*args)


# A wrapper per fused op, with its schema and its fake implementation.
for _op in FUSED_IR_OPS:
    _schema = str(_op._schema)
    _wrapper = torch.library.custom_op(
        f"fxsp_flashinfer::{_op._opname}",
        functools.partial(_kernel_or_reference, _op),
        mutates_args=(),
        schema=_schema[_schema.index("(") :],
    )
    _wrapper.register_fake(functools.partial(fake, _op))

FLASHINFER_ALLREDUCE_PROVIDER = Provider(
    name=FLASHINFER_ALLREDUCE,
    impls={op: getattr(_ops, op._opname).default for op in FUSED_IR_OPS},
    devices=frozenset({"cuda"}),
    dtypes=_DTYPES,
    priority=5,
    available=functools.partial(flashinfer_available, "comm"),
)

# On import: the fused ops exist only where the fusion gate (compile.options), which imports
# this module, allowed them. Only the cheap check: importing FlashInfer can take seconds (it may
# JIT-compile).
if flashinfer_installed():
    register_provider(FLASHINFER_ALLREDUCE_PROVIDER)
