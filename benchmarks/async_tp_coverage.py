"""How many of fxsp's SP sites Inductor's micro-pipeline TP can fuse, and fuses, per layout.

    .venv/bin/python benchmarks/async_tp_coverage.py

Single process, fake process group of 2 ranks, CPU. `fxsp.backend(async_tp=True)` turns
micro-pipeline TP on for fxsp's compiles; NCCL and symmetric memory are mocked
(fxsp.testing.async_tp) so Inductor runs the real fusion pass; the graph is compiled, not run
(the fused symm_mem ops have no CPU kernels). A site is *fusable* when its collective and a
matmul are joined through row-layout nodes alone (pads, trims, views), *fused* when micro-pipeline
TP turned it into a symm_mem op (fxsp.compile.stats.async_tp_sites). One line per layout or model,
then
a summary line.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fxsp.testing.async_tp import compile_for_coverage, totals  # noqa: E402
from fxsp.testing.tp_llama import Spec, TPLlama  # noqa: E402
from fxsp.testing.tp_moe import MoESpec, TPMoE  # noqa: E402


def cases() -> list:
    """(name, model, inputs, dynamic)."""
    llama = TPLlama(Spec())
    batched = TPLlama(Spec(batched=True))
    fp8 = TPLlama(
        Spec(fp8=True, scaled_mm=True, hidden=64, heads=4, inter=64)
    )  # _scaled_mm: sizes % 16
    broken = TPLlama(Spec(graph_break=True))
    moe = TPMoE(MoESpec())
    return [
        ("[T, H] 64 rows (TP divides)", llama, llama.example_input(64), False),
        ("[T, H] 37 rows (padded)", llama, llama.example_input(37), False),
        ("[B, S, H] 2 x 32", batched, batched.example_input(64), False),
        ("[B, S, H] 1 x 37 (padded)", batched, batched.example_input(37), False),
        ("[T, H] symbolic rows", llama, llama.example_input(37), True),
        ("FP8 scaled mm, 64 rows", fp8, fp8.example_input(64), False),
        ("FP8 scaled mm, 37 rows", fp8, fp8.example_input(37), False),
        ("graph break, 37 rows", broken, broken.example_input(37), False),
        ("MoE, 37 rows", moe, moe.example_input(37), False),
    ]


def main() -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    warnings.filterwarnings("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # a cache hit skips the passes
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    print(
        f"torch {torch.__version__}, fake process group of 2 ranks, "
        "micro-pipeline TP mocked on CPU\n"
    )
    print(f"{'layout / model':34} {'graphs':>6} {'fusable':>8} {'fused':>6}")
    all_fusable = all_fused = 0
    for name, model, inputs, dynamic in cases():
        reports = compile_for_coverage(model, inputs, dynamic=dynamic)
        fusable, fused = totals(reports)
        all_fusable, all_fused = all_fusable + fusable, all_fused + fused
        print(f"{name:34} {len(reports):>6} {fusable:>8} {fused:>6}")
        for report in reports:
            for why in report.async_tp.blocked if report.async_tp else []:
                print(f"    not fused: {why}")
    print(
        f"\nsummary: {all_fused} of {all_fusable} fusable sites fused "
        f"({100 * all_fused / max(all_fusable, 1):.0f}%)"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
