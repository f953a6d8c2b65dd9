"""Activation memory of a training step: the bytes autograd keeps for backward."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t  # a DTensor's shard


def kept_for_backward(model: nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps while `step()` computes a loss (then
    backpropagated), those of `model`'s parameters left out: a rank's activation memory.
    Compiled graphs included (AOT autograd saves through the same hooks)."""
    params = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _local(t).untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(kept.values())
