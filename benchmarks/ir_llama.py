"""Synthetic Llama-style graphs on fxsp's IR, the input both SP passes are measured on.

    graph = trace_ir_llama(layers=80)          # fake tensors: the graph only
    out = ir_llama(embeds, weights, group)     # the same computation, eagerly

Per layer, what a TP Llama's post-grad graph holds once fxsp's raising pass has run: column-
parallel q/k/v and gate/up matmuls, a row-parallel o / down matmul, one `fxsp.all_reduce`
after each, and every norm as one IR op (`fxsp.rms_norm` for the first, `fxsp.fused_add_rms_norm`
for every later one, the residual stream flowing from norm to norm). Softmax and SiLU are traced
with Inductor's decompositions, so the graph around the norms looks like a post-grad graph.

SP rewrites per graph: 1 first (none with `prompt_embeds`), 2 * layers - 1 middle, 1 last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

import fxsp.ir.ops  # noqa: F401 - defines torch.ops.fxsp

ir = torch.ops.fxsp

ROWS, HIDDEN, INTERMEDIATE = 8, 16, 32  # small: the graph is measured, not the math
EPS = 1e-6
GROUP = "0"  # the default process group's name


def ir_llama(
    embeds: torch.Tensor,
    weights: list,
    group: str = GROUP,
    eps: float = EPS,
    prompt_embeds: bool = False,
) -> torch.Tensor:
    """`embeds`: this rank's partial embedding sum, or (`prompt_embeds`) the full embeddings,
    the same on every rank. `weights`: per layer (input norm, wq, wk, wv, wo, post norm, gate,
    up, down), then the final norm's weight."""

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        return ir.all_reduce(x, group, "c10d")

    *layers, final_norm = weights
    hidden = embeds if prompt_embeds else all_reduce(embeds)
    residual, mlp_out = hidden, None  # each layer's MLP output is normed by the next
    for i, (input_norm, wq, wk, wv, wo, post_norm, gate, up, down) in enumerate(layers):
        if i == 0:
            x = ir.rms_norm(hidden, input_norm, eps)
        else:
            x, residual = ir.fused_add_rms_norm(all_reduce(mlp_out), residual, input_norm, eps)
        scores = torch.softmax((x @ wq) @ (x @ wk).t(), dim=-1)
        attention = all_reduce((scores @ (x @ wv)) @ wo)
        x, residual = ir.fused_add_rms_norm(attention, residual, post_norm, eps)
        mlp_out = (F.silu(x @ gate) * (x @ up)) @ down
    out, _ = ir.fused_add_rms_norm(all_reduce(mlp_out), residual, final_norm, eps)
    return out


def layer_weights(
    layers: int,
    tp: int = 2,
    hidden: int = HIDDEN,
    inter: int = INTERMEDIATE,
    seed: int = 0,
    rank: int = 0,
) -> list:
    """One rank's shard of full weights drawn from `seed`: q/k/v, gate/up split by columns,
    o/down by rows, norms whole."""
    g = torch.Generator().manual_seed(seed)

    def full(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[0] ** 0.5

    def cols(rows: int, columns: int) -> torch.Tensor:
        return full(rows, columns).chunk(tp, 1)[rank].contiguous()

    def rows(rows: int, columns: int) -> torch.Tensor:
        return full(rows, columns).chunk(tp, 0)[rank].contiguous()

    def norm() -> torch.Tensor:
        return 1 + 0.1 * torch.randn(hidden, generator=g)

    weights = [
        (
            norm(),
            cols(hidden, hidden),
            cols(hidden, hidden),
            cols(hidden, hidden),
            rows(hidden, hidden),
            norm(),
            cols(hidden, inter),
            cols(hidden, inter),
            rows(inter, hidden),
        )
        for _ in range(layers)
    ]
    return [*weights, norm()]


def trace_ir_llama(
    layers: int, rows: int = ROWS, prompt_embeds: bool = False, eps: float = EPS
) -> GraphModule:
    """The IR graph of `layers` layers, every value's `meta["val"]` a fake tensor of one
    shared fake mode (as in the post-grad graphs torch.compile hands to a pass)."""
    from torch._inductor.decomposition import select_decomp_table

    def fn(embeds: torch.Tensor, weights: list) -> torch.Tensor:
        return ir_llama(embeds, weights, eps=eps, prompt_embeds=prompt_embeds)

    gm = make_fx(fn, select_decomp_table(), tracing_mode="fake")(
        torch.randn(rows, HIDDEN), layer_weights(layers)
    )
    gm.graph.eliminate_dead_code()  # the unused getitems make_fx leaves behind
    gm.recompile()
    return gm
