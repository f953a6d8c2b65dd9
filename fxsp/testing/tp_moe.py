"""A small tensor-parallel mixture-of-experts (MoE) model, Mixtral / Qwen2-MoE style, for the
numerics tests.

Every rank builds the full weights from one seed and keeps its shard:

- the router is replicated: every rank scores every expert for every token (softmax in fp32,
  top-k, optionally renormalised), so every rank routes identically;
- each expert's intermediate dim is split across ranks (gate/up column-parallel, down
  row-parallel), so each rank computes a partial output of every expert; the routing weights
  are the same on every rank, so the weighted sum of partials, all-reduced, is the full MoE
  output;
- an optional shared expert (Qwen2-MoE), sharded the same way, with a replicated sigmoid gate,
  is added before the one all-reduce;
- attention heads are split across ranks as in `tp_llama`; the embedding by vocabulary.

A decoder layer is HF's: `residual + attention(norm(h))`, then `residual + moe(norm(h))`, the
all-reduces inside attention and the MoE. Experts run on every token and are combined with
static shapes, two ways (`dispatch`): "gather" picks each token's top-k expert outputs by index,
"dense" weights every expert by a [tokens, experts] routing matrix (zero off the top-k).
Run eagerly, the model is the reference the compiled, rewritten one must equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .tp_llama import ModelSpec, RMSNorm, TPModel


@dataclass(frozen=True)
class MoESpec(ModelSpec):
    experts: int = 4
    top_k: int = 2
    expert_inter: int = 24  # per expert; divisible by TP sizes 2 and 3
    dispatch: str = "gather"  # "gather" or "dense", see the module docstring
    norm_topk_prob: bool = True  # renormalise the top-k probabilities (Mixtral) or not
    shared_expert: bool = False  # a sigmoid-gated shared expert (Qwen2-MoE)
    # The shared expert all-reduced on its own and added to the all-reduced routed output: the
    # norm then follows a sum of two all-reduces.
    shared_all_reduce: bool = False
    attention: bool = True  # attention before each MoE; False: MoE-only layers
    # All-reduce the MoE output as [T, H] rows and reshape after (vLLM's FusedMoE reduces rows):
    # with batched activations a reshape then sits between the all-reduce and the residual add.
    reduce_rows: bool = False


class TPMoE(TPModel):
    def __init__(self, spec: MoESpec, group: dist.ProcessGroup | None = None) -> None:
        if spec.dispatch not in ("gather", "dense"):
            raise ValueError(f"dispatch must be 'gather' or 'dense', not {spec.dispatch!r}")
        super().__init__(spec, group)
        h, tp, e = spec.hidden, self.tp, spec.experts
        assert spec.expert_inter % tp == 0

        def shard(full: torch.Tensor, dim: int) -> nn.Parameter:
            return nn.Parameter(full.chunk(tp, dim)[self.rank].clone())

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape) / shape[-1] ** 0.5

        self.layers = nn.ModuleList()
        for _ in range(spec.layers):
            layer = nn.Module()
            layer.post_norm = RMSNorm(spec)
            if spec.attention:
                layer.input_norm = RMSNorm(spec)
                layer.qkv = nn.ParameterList([shard(randn(h, h), 0) for _ in range(3)])
                layer.o = shard(randn(h, h), 1)
            layer.router = nn.Parameter(randn(e, h))  # replicated
            layer.gate = shard(randn(e, spec.expert_inter, h), 1)  # [E, I/tp, H]
            layer.up = shard(randn(e, spec.expert_inter, h), 1)
            layer.down = shard(randn(e, h, spec.expert_inter), 2)  # [E, H, I/tp]
            if spec.shared_expert:
                layer.shared_gate = shard(randn(spec.expert_inter, h), 0)
                layer.shared_up = shard(randn(spec.expert_inter, h), 0)
                layer.shared_down = shard(randn(h, spec.expert_inter), 1)
                layer.shared_expert_gate = nn.Parameter(randn(1, h))  # replicated
            self.layers.append(layer)
        self.final_norm = RMSNorm(spec)
        self.to(spec.dtype)

    def attention(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        seq = x if x.dim() == 3 else x.unsqueeze(0)

        def heads(w: torch.Tensor) -> torch.Tensor:
            t = F.linear(seq, w)
            return t.reshape(t.shape[0], t.shape[1], self.local_heads, self.head_dim).transpose(
                1, 2
            )

        att = F.scaled_dot_product_attention(*(heads(w) for w in layer.qkv), is_causal=True)
        att = att.transpose(1, 2).reshape(*x.shape[:-1], -1)
        return self.all_reduce(F.linear(att, layer.o))

    def route(self, layer: nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in the activation dtype, chosen experts [T, k])."""
        probs = torch.softmax(F.linear(rows, layer.router).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.spec.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(rows.dtype), chosen

    def moe(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(layer, rows)
        # This rank's part of every expert's output for every token: [E, T, H].
        inner = F.silu(torch.einsum("th,eih->eti", rows, layer.gate)) * torch.einsum(
            "th,eih->eti", rows, layer.up
        )
        experts = torch.einsum("eti,ehi->eth", inner, layer.down)
        if self.spec.dispatch == "gather":
            tokens = torch.arange(rows.shape[0], device=rows.device).unsqueeze(-1)
            picked = experts[chosen, tokens]  # [T, k, H]
            out = (weights.unsqueeze(-1) * picked).sum(dim=1)
        else:
            routing = torch.zeros(
                rows.shape[0], self.spec.experts, dtype=rows.dtype, device=rows.device
            ).scatter(1, chosen, weights)
            out = torch.einsum("te,eth->th", routing, experts)
        shared = None
        if self.spec.shared_expert:
            shared = F.linear(
                F.silu(F.linear(rows, layer.shared_gate)) * F.linear(rows, layer.shared_up),
                layer.shared_down,
            )
            shared = torch.sigmoid(F.linear(rows, layer.shared_expert_gate)) * shared
            if not self.spec.shared_all_reduce:
                out, shared = out + shared, None
        if self.spec.reduce_rows:
            out = self.all_reduce(out).reshape(x.shape)
        else:
            out = self.all_reduce(out.reshape(x.shape))
        if shared is not None:
            out = out + self.all_reduce(shared.reshape(x.shape))
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(tokens)
        for layer in self.layers:
            if self.spec.attention:
                residual = hidden
                hidden = residual + self.attention(layer, layer.input_norm(hidden))
            residual = hidden
            hidden = residual + self.moe(layer, layer.post_norm(hidden))
        return self.final_norm(hidden)
