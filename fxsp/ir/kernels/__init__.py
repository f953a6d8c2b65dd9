"""GPU kernels for fxsp's IR ops, as providers (`ir/providers.py`): Triton's (`triton.py`) and
FlashInfer's (`flashinfer.py`). Nothing here is imported by `import fxsp`."""

from __future__ import annotations

from ..providers import providers, register_provider


def load_gpu_providers() -> list[str]:
    """Register the GPU kernel providers (Triton, FlashInfer) whose libraries are installed, so
    this is safe anywhere. Returns the registered providers' names."""
    from . import flashinfer, triton  # noqa: F401 - Triton registers on import

    if flashinfer.flashinfer_installed():
        register_provider(flashinfer.FLASHINFER_PROVIDER)
    return [p.name for p in providers()]
