"""Provider registry: who implements each IR op, where, and how much we prefer them.

Lowering asks `choose(op, device_type, dtype)` for each IR node. The reference provider
(`"aten"`: the op's plain-torch decomposition, which Inductor fuses into neighbouring kernels)
implements every op on every device and is the fallback. Kernel providers (Triton, FlashInfer)
register themselves with a priority; the highest-priority provider that implements the op, runs
on the device, accepts the dtype and is available wins.

A provider's implementation of an op must itself be a registered torch op (a `torch.library`
custom op) with the IR op's signature, so that the lowered graph stays traceable. Inductor calls
a plain custom op as an extern kernel; a `torch.library.triton_op` is spliced in by lowering as
its traced body, so Inductor launches its Triton kernels from its own generated code.

A provider may also list a fused kernel for a chain of IR ops under a tuple key, e.g.
`(RMS_NORM, STATIC_FP8_QUANT)`: its op takes the producer's arguments followed by the consumer's,
less the tensor that connects them, and returns the consumer's result (plus the producer's other
outputs). `choose((RMS_NORM, STATIC_FP8_QUANT), device_type, dtype)` finds it like any op.

The GPU providers live in `kernels/`; `kernels.load_gpu_providers()` registers those whose
libraries are present (FlashInfer's all-reduce fusion registers itself on import, see
`kernels/flashinfer.py`). This registry imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

REFERENCE = "aten"


@dataclass(frozen=True)
class Provider:
    name: str
    impls: dict  # IR op (OpOverload) -> op overload with the same signature
    devices: frozenset  # device types, e.g. {"cuda"}
    dtypes: frozenset | None = None  # accepted input dtypes; None: any
    priority: int = 0
    available: Callable[[], bool] = field(default=lambda: True)

    def serves(self, op: Any, device_type: str, dtype: torch.dtype | None) -> bool:
        return (
            op in self.impls
            and device_type in self.devices
            and (self.dtypes is None or dtype in self.dtypes)
            and self.available()
        )


_providers: dict[str, Provider] = {}


def register_provider(provider: Provider) -> None:
    """Add (or replace, by name) a provider."""
    if provider.name == REFERENCE:
        raise ValueError(f"{REFERENCE!r} is the built-in reference and cannot be replaced")
    _providers[provider.name] = provider


def unregister_provider(name: str) -> None:
    _providers.pop(name, None)


def providers() -> list[Provider]:
    """Registered kernel providers, best first (priority, then name, for determinism)."""
    return sorted(_providers.values(), key=lambda p: (-p.priority, p.name))


def choose(
    op: Any, device_type: str, dtype: torch.dtype | None, allowed: tuple[str, ...] | None = None
) -> Provider | None:
    """The provider to lower `op` with, or None for the reference decomposition.

    `allowed` restricts the choice to the named providers (None: any registered one).
    """
    for p in providers():
        if (allowed is None or p.name in allowed) and p.serves(op, device_type, dtype):
            return p
    return None
