"""Training a TP Llama with fxsp: sequence parallelism in forward and backward, automatically.

    torchrun --nproc-per-node 2 examples/train_tp.py [--steps 5] [--batch 2] [--seq 13]
        [--recompute-gathers] [--async-tp]

A small random HF Llama (4 layers, hidden 192) parallelised with a plain DTensor TP plan (its
`base_model_tp_plan` and a vocab-parallel embedding), then a few AdamW steps compiled with
`fxsp.backend(mesh)` beside the same steps in eager TP. It prints the SP rewrites fxsp made on
the training graph; per step, the loss of both and the largest difference of any parameter's
gradient from eager TP's over all ranks (the first step's is fxsp's own; AdamW then amplifies
rounding in small gradients, so later steps start from parameters a little apart); and the
activation bytes autograd keeps per rank with fxsp's SP and with plain TP compiled by Inductor.
GPUs over NCCL when there is one per rank, else CPU over gloo. `--async-tp` fuses the SP
collectives of the forward and backward graphs with their matmuls and prints what fused (it needs
NCCL and symmetric memory; on gloo fxsp says why not, once, and compiles without).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import fxsp
from fxsp.testing.hf import parallelize, plan_of, tiny_model
from fxsp.testing.launch import init_torchrun
from fxsp.testing.memory import kept_for_backward

CONFIG = dict(  # 12 heads: whole heads per rank at TP 2, 3 and 4
    hidden_size=192,
    num_attention_heads=12,
    num_key_value_heads=12,
    intermediate_size=384,
    num_hidden_layers=4,
    vocab_size=256,
)


def tp_llama(mesh, device: torch.device) -> torch.nn.Module:
    model = tiny_model("llama", **CONFIG).to(device).train()
    return parallelize(model, mesh, {**plan_of(model), "embed_tokens": "embedding_rowwise"})


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=13, help="need not divide by TP")
    parser.add_argument(
        "--recompute-gathers", action="store_true", help="all-gather again in backward"
    )
    parser.add_argument(
        "--async-tp", action="store_true", help="fuse the collectives with their matmuls"
    )
    args = parser.parse_args()

    rank, world, device, _ = init_torchrun()
    mesh = init_device_mesh(device.type, (world,))

    eager, model = tp_llama(mesh, device), tp_llama(mesh, device)
    backend = fxsp.backend(mesh, recompute_gathers=args.recompute_gathers, async_tp=args.async_tp)
    compiled = torch.compile(model, backend=backend)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, model)]
    data = torch.Generator().manual_seed(0)
    for step in range(args.steps):
        ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq), generator=data)
        ids = ids.to(device)
        losses = []
        for run in (eager, compiled):
            loss = run(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
        worst = max(  # each parameter's gradient against eager TP's, relative to its largest
            ((local(b.grad) - local(a.grad)).abs().max() / local(a.grad).abs().max()).item()
            for a, b in zip(eager.parameters(), model.parameters(), strict=True)
        )
        worst = torch.tensor(worst, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        if rank == 0:
            if step == 0:
                for report in backend.training_reports:
                    print(f"training graph: SP rewrites {report.counts}")
                    for miss in report.misses:
                        print(f"  not rewritten: {miss}")
                for graph, report in zip(("forward", "backward"), backend.reports):
                    if report.async_tp is not None:
                        print(f"{graph} graph: {report.async_tp}")
            print(
                f"step {step}: loss eager TP {losses[0]:.6f}, fxsp {losses[1]:.6f}; largest "
                f"gradient difference over all ranks {worst:.1e} (relative)"
            )

    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq), generator=data)
    ids = ids.to(device)
    sp_bytes = kept_for_backward(model, lambda: compiled(ids, labels=ids).loss)
    torch._dynamo.reset()  # the same model compiled again, by Inductor alone: plain TP
    plain = torch.compile(model)
    tp_bytes = kept_for_backward(model, lambda: plain(ids, labels=ids).loss)
    model.zero_grad()
    if rank == 0:
        print(
            f"activation bytes kept for backward per rank: fxsp's SP {sp_bytes / 1024:.1f} KiB, "
            f"plain TP {tp_bytes / 1024:.1f} KiB ({sp_bytes / tp_bytes:.2f}×)"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
