"""Activation memory of a training step: what autograd keeps for backward, per rank.

    .venv/bin/python benchmarks/training_memory.py [--worlds 2 3 4 8] [--layers 2] [--tokens 512]

A Llama-like HF model (hidden 768, 24 heads, MLP 1536, vocab 512, fp32) with a vocab-parallel
embedding, one forward of [batch, tokens / batch] under `torch.autograd.graph.saved_tensors_hooks`
on the fake process group of each world size (the collectives compute nothing; shapes, and so
bytes, are a real rank's). Side by side, all compiled with Inductor:

- TP: the DTensor TP plan (ColwiseParallel / RowwiseParallel), plain `torch.compile`;
- hand SP: torchtitan's hand-written SP plan on the same model (`SequenceParallel` norms,
  `PrepareModuleInput` gathers before attention and MLP, `RowwiseParallel(output_layouts=
  Shard(1))`), plain `torch.compile`;
- fxsp: the TP plan compiled with `fxsp.backend(mesh)`;
- fxsp, gathers again: `fxsp.backend(mesh, recompute_gathers=True)` (Megatron's way: the
  column-parallel inputs are all-gathered again in backward, not kept).

Bytes kept: the distinct storages the hooks see, the parameters' left out. Also: fxsp's share of
the compile (its rewrite of Dynamo's graph and its post-grad passes over the whole first call).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `fxsp` from a checkout

import fxsp
import fxsp.compile.backend
import fxsp.training.dtensor
from fxsp.testing.hf import parallelize, parallelize_sp_by_hand, plan_of, tiny_model
from fxsp.testing.memory import kept_for_backward

CONFIG = dict(  # 24 heads: whole heads per rank at TP 2, 3, 4 and 8
    hidden_size=768,
    num_attention_heads=24,
    num_key_value_heads=24,
    intermediate_size=1536,
    vocab_size=512,
)
VARIANTS = ("TP", "hand SP", "fxsp", "fxsp, gathers again")


def tp_model(layers: int, mesh) -> torch.nn.Module:
    """The model with its HF TP plan and a vocab-parallel embedding (as torchtitan's plan)."""
    model = tiny_model("llama", num_hidden_layers=layers, **CONFIG).train()
    plan = {**plan_of(model), "embed_tokens": "embedding_rowwise"}
    return parallelize(model, mesh, plan)


class FxspClock:
    """Seconds spent in fxsp's rewrites (Dynamo graph and post-grad) while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._patched = []

    def wrap(self, module, name: str) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(module, name, timed)
        self._patched.append((module, name, original))

    def __enter__(self) -> FxspClock:
        self.wrap(fxsp.training.dtensor, "sequence_parallel")
        self.wrap(fxsp.compile.backend, "run_passes")
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in self._patched:
            setattr(module, name, original)


def measure(world: int, layers: int, ids: torch.Tensor) -> dict:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        out = {}
        for variant in VARIANTS:
            torch._dynamo.reset()
            if variant == "hand SP":
                model = tiny_model("llama", num_hidden_layers=layers, **CONFIG).train()
                model, backend = parallelize_sp_by_hand(model, mesh), "inductor"
            elif variant == "TP":
                model, backend = tp_model(layers, mesh), "inductor"
            else:
                model = tp_model(layers, mesh)
                backend = fxsp.backend(
                    mesh, min_tokens=0, recompute_gathers=variant == "fxsp, gathers again"
                )
            compiled = torch.compile(model, backend=backend)

            def step(compiled=compiled):
                return compiled(ids, labels=ids).loss

            with FxspClock() as clock:
                start = time.perf_counter()
                kept_for_backward(model, step)  # the first call compiles forward and backward
                compile_seconds = time.perf_counter() - start
            out[variant] = (kept_for_backward(model, step), compile_seconds, clock.seconds)
            if variant == "fxsp":
                out["sites"] = sum(r.sites for r in backend.training_reports)
        return out
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512, help="per sequence")
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(3, CONFIG["vocab_size"], (args.batch, args.tokens))
    print(
        f"Llama-like, {args.layers} layers, hidden {CONFIG['hidden_size']}, [B, S] = "
        f"[{args.batch}, {args.tokens}], fp32: activation bytes autograd keeps per rank (MiB)"
    )
    head = f"{'TP':>4} | " + " | ".join(f"{v:>19}" for v in VARIANTS) + " | fxsp / hand SP"
    print(head + " | fxsp's share of compile")
    for world in args.worlds:
        got = measure(world, args.layers, ids)
        mib = {v: got[v][0] / 2**20 for v in VARIANTS}
        cells = " | ".join(f"{mib[v]:>12.2f} ({mib[v] / mib['TP']:.2f}×)" for v in VARIANTS)
        _, seconds, fxsp_seconds = got["fxsp"]
        print(
            f"{world:>4} | {cells} | {mib['fxsp'] / mib['hand SP']:>15.2f} | "
            f"{fxsp_seconds:.2f} s of {seconds:.1f} s ({100 * fxsp_seconds / seconds:.1f} %), "
            f"{got['sites']} sites"
        )


if __name__ == "__main__":
    main()
