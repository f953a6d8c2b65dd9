"""Stand-ins for the vLLM ops fxsp recognises, for tests on machines without vLLM.

`register_vllm_standins()` defines, once per process, ops with vLLM's schemas and kernel
numerics, so graphs traced here are spelled like graphs traced with vLLM:

- `_C.rms_norm(Tensor! result, Tensor input, Tensor weight, float epsilon) -> ()`
- `_C.fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()`
- `_C.static_scaled_fp8_quant(Tensor! result, Tensor input, Tensor scale) -> ()`
- `_C.rms_norm_static_fp8_quant(Tensor! result, Tensor input, Tensor weight, Tensor scale,
  float epsilon)`, `_C.fused_add_rms_norm_static_fp8_quant(Tensor! result, Tensor input,
  Tensor! residual, Tensor weight, Tensor scale, float epsilon)`: what vLLM's norm + quant
  fusion produces
- `vllm_ir.rms_norm(x, weight?, epsilon, variance_size=None)`,
  `vllm_ir.fused_add_rms_norm(x, x_residual, weight?, epsilon, variance_size=None)`
- `vllm.all_reduce(tensor, group_name)`, `vllm.reduce_scatter(tensor, dim, world_size,
  group_name)`, `vllm.all_gather(tensor, dim, world_size, group_name)`: the group name is a
  c10d group name here (vLLM's own names such as "tp:0" are not resolvable without vLLM), and
  they really communicate, so they work in a gloo world too.
- `vllm.sequence_parallel_chunk_impl(x)`: this rank's block of x's rows padded to a multiple of
  the TP size (the default group's size here).

When real vLLM ops are already loaded, nothing is registered.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as fc
from torch import Tensor
from torch.library import Library

_libraries: list[Library] = []  # keep the registrations alive


def _has(namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _define(namespace: str, schema: str, impl, fake=None) -> None:
    name = schema.split("(", 1)[0]
    if _has(namespace, name):
        return
    lib = Library(namespace, "FRAGMENT")  # noqa: TOR901 - stand-ins for another project's ops
    _libraries.append(lib)
    lib.define(schema)
    lib.impl(name, impl, "CompositeExplicitAutograd")
    if fake is not None:
        torch.library.register_fake(f"{namespace}::{name}", fake, lib=lib)


# Kernel numerics: fp32 math, the normalised value rounded to the activation dtype before the
# weight multiply (as vLLM's CUDA kernels do).


def _norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else normed * weight


def _c_rms_norm(result: Tensor, input: Tensor, weight: Tensor, epsilon: float) -> None:
    result.copy_(_norm(input, weight, epsilon))


def _c_fused_add_rms_norm(input: Tensor, residual: Tensor, weight: Tensor, epsilon: float) -> None:
    residual.copy_(input + residual)
    input.copy_(_norm(residual, weight, epsilon))


def _c_static_scaled_fp8_quant(result: Tensor, input: Tensor, scale: Tensor) -> None:
    bound = torch.finfo(result.dtype).max
    result.copy_((input.float() / scale.float()).clamp(-bound, bound).to(result.dtype))


def _c_rms_norm_static_fp8_quant(
    result: Tensor, input: Tensor, weight: Tensor, scale: Tensor, epsilon: float
) -> None:
    # vLLM's kernel: the norm as above, then x * (1 / scale), clamped to the fp8 range.
    bound = torch.finfo(result.dtype).max
    inverse = 1.0 / scale.float()
    result.copy_(
        (_norm(input, weight, epsilon).float() * inverse).clamp(-bound, bound).to(result.dtype)
    )


def _c_fused_add_rms_norm_static_fp8_quant(
    result: Tensor, input: Tensor, residual: Tensor, weight: Tensor, scale: Tensor, epsilon: float
) -> None:
    residual.copy_(input + residual)
    _c_rms_norm_static_fp8_quant(result, residual, weight, scale, epsilon)


def _ir_rms_norm(
    x: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None
) -> Tensor:
    xf = x.float()
    var = (xf if variance_size is None else xf[..., :variance_size]).pow(2).mean(-1, keepdim=True)
    normed = (xf * torch.rsqrt(var + epsilon)).to(x.dtype)
    return normed if weight is None else normed * weight


def _ir_fused_add_rms_norm(
    x: Tensor,
    x_residual: Tensor,
    weight: Tensor | None,
    epsilon: float,
    variance_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    # vLLM's reference normalises the fp32 sum and returns the sum rounded to x's dtype.
    total = x.float() + x_residual.float()
    var = (
        (total if variance_size is None else total[..., :variance_size])
        .pow(2)
        .mean(-1, keepdim=True)
    )
    normed = (total * torch.rsqrt(var + epsilon)).to(x.dtype)
    return normed if weight is None else normed * weight, total.to(x.dtype)


def _all_reduce(tensor: Tensor, group_name: str) -> Tensor:
    return fc.wait_tensor(torch.ops._c10d_functional.all_reduce(tensor, "sum", group_name))


def _reduce_scatter(tensor: Tensor, dim: int, world_size: int, group_name: str) -> Tensor:
    moved = tensor.movedim(dim, 0).contiguous()
    out = torch.ops._c10d_functional.reduce_scatter_tensor(moved, "sum", world_size, group_name)
    return fc.wait_tensor(out).movedim(0, dim).contiguous()


def _all_gather(tensor: Tensor, dim: int, world_size: int, group_name: str) -> Tensor:
    moved = tensor.movedim(dim, 0).contiguous()
    out = torch.ops._c10d_functional.all_gather_into_tensor(moved, world_size, group_name)
    return fc.wait_tensor(out).movedim(0, dim).contiguous()


def _sequence_parallel_chunk(x: Tensor) -> Tensor:
    # vLLM's: pad the rows to a multiple of the TP size (the default group here), keep this
    # rank's block.
    tp, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    padded = torch.nn.functional.pad(x, (0, 0, 0, -x.shape[0] % tp))
    per_rank = padded.shape[0] // tp
    return padded[rank * per_rank : (rank + 1) * per_rank].clone()


def _sequence_parallel_chunk_fake(x: Tensor) -> Tensor:
    tp = torch.distributed.get_world_size()
    return x.new_empty([-(-x.shape[0] // tp), *x.shape[1:]])


def _scattered_fake(tensor, dim, world_size, group_name):
    shape = list(tensor.shape)
    shape[dim] //= world_size
    return tensor.new_empty(shape)


def _gathered_fake(tensor, dim, world_size, group_name):
    shape = list(tensor.shape)
    shape[dim] *= world_size
    return tensor.new_empty(shape)


def register_vllm_standins() -> None:
    """Define the stand-in ops (idempotent; a no-op for ops that already exist)."""
    _define(
        "_C",
        "rms_norm(Tensor! result, Tensor input, Tensor weight, float epsilon) -> ()",
        _c_rms_norm,
        lambda result, input, weight, epsilon: None,
    )
    _define(
        "_C",
        "fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()",
        _c_fused_add_rms_norm,
        lambda input, residual, weight, epsilon: None,
    )
    _define(
        "_C",
        "static_scaled_fp8_quant(Tensor! result, Tensor input, Tensor scale) -> ()",
        _c_static_scaled_fp8_quant,
        lambda result, input, scale: None,
    )
    _define(
        "_C",
        "rms_norm_static_fp8_quant(Tensor! result, Tensor input, Tensor weight, Tensor scale, "
        "float epsilon) -> ()",
        _c_rms_norm_static_fp8_quant,
        lambda *args: None,
    )
    _define(
        "_C",
        "fused_add_rms_norm_static_fp8_quant(Tensor! result, Tensor input, Tensor! residual, "
        "Tensor weight, Tensor scale, float epsilon) -> ()",
        _c_fused_add_rms_norm_static_fp8_quant,
        lambda *args: None,
    )
    _define(
        "vllm_ir",
        "rms_norm(Tensor x, Tensor? weight, float epsilon, SymInt? variance_size=None) -> Tensor",
        _ir_rms_norm,
    )
    _define(
        "vllm_ir",
        "fused_add_rms_norm(Tensor x, Tensor x_residual, Tensor? weight, float epsilon, "
        "SymInt? variance_size=None) -> (Tensor, Tensor)",
        _ir_fused_add_rms_norm,
    )
    _define(
        "vllm",
        "all_reduce(Tensor tensor, str group_name) -> Tensor",
        _all_reduce,
        lambda tensor, group_name: torch.empty_like(tensor),
    )
    _define(
        "vllm",
        "sequence_parallel_chunk_impl(Tensor x) -> Tensor",
        _sequence_parallel_chunk,
        _sequence_parallel_chunk_fake,
    )
    _define(
        "vllm",
        "reduce_scatter(Tensor tensor, SymInt dim, SymInt world_size, str group_name) -> Tensor",
        _reduce_scatter,
        _scattered_fake,
    )
    _define(
        "vllm",
        "all_gather(Tensor tensor, SymInt dim, SymInt world_size, str group_name) -> Tensor",
        _all_gather,
        _gathered_fake,
    )
