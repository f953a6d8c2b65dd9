"""Achieved memory bandwidth of fused add+RMSNorm kernels, against the device's copy bandwidth.

    python benchmarks/norm_bandwidth.py [--rows 4096] [--hidden 8192] [--dtype bf16]

Compares, on one CUDA device:
- fxsp's Triton kernel (`fxsp_triton::fused_add_rms_norm`, and its static-FP8-quant form),
- Inductor's own kernel for the reference (`torch.compile` of `fused_add_rms_norm_reference`),
- FlashInfer's `fused_add_rmsnorm`, if installed (timed in place, as FlashInfer runs it),
- a plain `copy_` of a large tensor: the bandwidth a memory-bound kernel can hope for.

A kernel's bandwidth counts the bytes it must move once: read x and residual, write out and
residual_out (the weight is one row, read from cache). The goal (issue 8) is at least 85 % of
copy bandwidth, and no slower than Inductor's or FlashInfer's kernel. Without CUDA the script
says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_ms(fn: Callable[[], object], warmup: int = 10, repeats: int = 100) -> float:
    """Median time of one call, in milliseconds, from CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, gib: float = 2.0) -> float:
    """GB/s of `dst.copy_(src)` over a tensor far larger than the L2 cache (read + write)."""
    src = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), repeats=30)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--eps", type=float, default=1e-6)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("norm_bandwidth: no CUDA device here; this benchmark needs a GPU. Skipping.")
        return 0
    try:
        from fxsp.ir import triton_kernels  # defines torch.ops.fxsp_triton
    except ImportError as error:
        print(f"norm_bandwidth: cannot load the Triton kernels ({error}). Skipping.")
        return 0
    if triton_kernels.triton is None:
        print("norm_bandwidth: Triton is not installed. Skipping.")
        return 0
    from fxsp.ir.ops import fused_add_rms_norm_reference, static_fp8_quant_reference

    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    x = torch.randn(args.rows, args.hidden, dtype=dtype, device=device)
    residual = torch.randn_like(x)
    weight = torch.randn(args.hidden, dtype=dtype, device=device)
    scale = torch.tensor(0.05, device=device)
    fp8 = torch.float8_e4m3fn
    eps = args.eps
    element = x.element_size()
    norm_bytes = 4 * x.numel() * element  # read x, residual; write out, residual_out
    quant_bytes = 3 * x.numel() * element + x.numel()  # the normed output is one FP8 byte

    triton_norm = torch.ops.fxsp_triton.fused_add_rms_norm
    triton_quant = torch.ops.fxsp_triton.fused_add_rms_norm_static_fp8_quant
    inductor_norm = torch.compile(fused_add_rms_norm_reference, fullgraph=True)

    def reference_quant(x, residual, weight, eps, scale):
        out, residual_out = fused_add_rms_norm_reference(x, residual, weight, eps)
        return static_fp8_quant_reference(out, scale, fp8), residual_out

    inductor_quant = torch.compile(reference_quant, fullgraph=True)

    # Check before timing: a fast wrong kernel is no result.
    expected_out, expected_residual = fused_add_rms_norm_reference(x, residual, weight, eps)
    out, residual_out = triton_norm(x, residual, weight, eps)
    assert torch.equal(residual_out, expected_residual), "residual_out differs from reference"
    max_error = (out.float() - expected_out.float()).abs().max().item()

    cases: list[tuple[str, Callable[[], object], int]] = [
        ("fxsp triton fused add+RMSNorm", lambda: triton_norm(x, residual, weight, eps),
         norm_bytes),
        ("inductor fused add+RMSNorm", lambda: inductor_norm(x, residual, weight, eps),
         norm_bytes),
    ]
    flashinfer_norm = _flashinfer_norm()
    if flashinfer_norm is not None and dtype in (torch.bfloat16, torch.float16):
        flashinfer_x, flashinfer_residual = x.clone(), residual.clone()
        cases.append(("flashinfer fused_add_rmsnorm (in place)",
                      lambda: flashinfer_norm.fused_add_rmsnorm(flashinfer_x, flashinfer_residual,
                                                                weight, eps),
                      norm_bytes))
    cases += [
        ("fxsp triton fused add+RMSNorm+FP8 quant",
         lambda: triton_quant(x, residual, weight, eps, scale, fp8), quant_bytes),
        ("inductor fused add+RMSNorm+FP8 quant",
         lambda: inductor_quant(x, residual, weight, eps, scale), quant_bytes),
    ]

    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device: {torch.cuda.get_device_name(device)}; rows x hidden = {args.rows} x "
          f"{args.hidden} {args.dtype}; triton max |out - reference| = {max_error:.3g}")
    print(f"{'kernel':<44}{'time (us)':>12}{'GB/s':>10}{'of copy':>10}")
    print(f"{'copy_ (2 GiB fp32)':<44}{'':>12}{copy_gbs:>10.0f}{'100 %':>10}")
    achieved = {}
    for name, fn, moved in cases:
        ms = time_ms(fn)
        achieved[name] = moved / ms / 1e6
        print(f"{name:<44}{ms * 1e3:>12.1f}{achieved[name]:>10.0f}"
              f"{100 * achieved[name] / copy_gbs:>8.1f} %")

    ours = achieved["fxsp triton fused add+RMSNorm"]
    others = ", ".join(f"{name.split()[0]} {gbs:.0f} GB/s" for name, gbs in achieved.items()
                       if "quant" not in name and not name.startswith("fxsp"))
    print(f"summary: triton fused add+RMSNorm {ours:.0f} GB/s = {100 * ours / copy_gbs:.1f} % of "
          f"copy bandwidth ({copy_gbs:.0f} GB/s; goal >= 85 %); {others}")
    return 0


def _flashinfer_norm():
    try:
        import flashinfer.norm
    except Exception:  # noqa: BLE001 - missing or unusable: leave it out of the table
        return None
    return flashinfer.norm


if __name__ == "__main__":
    sys.exit(main())
