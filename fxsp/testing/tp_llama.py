"""A small tensor-parallel Llama-style model for the SP tests, the demo and the benchmarks.

Every rank builds the full weights from one seed and keeps its shard: attention heads and MLP
columns are split across ranks (column-parallel in, row-parallel out, one all-reduce after
each), the embedding is split by vocabulary. Run eagerly, the model is the reference the
compiled, rewritten one must equal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class ModelSpec:
    """What every test model has (see `Spec` and `tp_moe.MoESpec`)."""

    layers: int = 2
    hidden: int = 48
    heads: int = 6  # divisible by TP sizes 2 and 3
    vocab: int = 60
    eps: float = 1e-6
    norm: str = "hf"  # "hf" (pow/mean/rsqrt) or "torch" (F.rms_norm)
    dtype: torch.dtype = torch.float32
    batched: bool = False  # activations [B, S, H] instead of [T, H]
    prompt_embeds: bool = False  # the model takes embeddings: no first all-reduce in the graph
    # "funcol", "inplace" (dist.all_reduce) or "autograd": Megatron's autograd functions, the
    # all-reduce `ReduceFromTP` and its conjugate `CopyToTP` before column-parallel matmuls
    collective: str = "funcol"

    def with_(self, **changes) -> ModelSpec:
        return replace(self, **changes)


@dataclass(frozen=True)
class Spec(ModelSpec):
    inter: int = 48
    fp8: bool = False  # static FP8 quant after every norm (dequantised before the matmul)
    scaled_mm: bool = False  # with fp8: the FP8 activation feeds torch._scaled_mm instead
    graph_break: bool = False  # a graph break between layers
    final_norm: bool = True


class RMSNorm(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(spec.hidden))
        self.eps, self.style = spec.eps, spec.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "torch":
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * xf.to(dtype)


def static_fp8(x: torch.Tensor, scale: torch.Tensor, dequantise: bool = True) -> torch.Tensor:
    """Quantise (and dequantise): the graph carries the FP8 quant the SP FP8 rules look for."""
    q = (x.float() / scale).clamp(-448.0, 448.0).to(FP8)
    return q.float().to(x.dtype) * scale.to(x.dtype) if dequantise else q


class ReduceFromTP(torch.autograd.Function):
    """Megatron's "g": all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        return grad, None


class CopyToTP(torch.autograd.Function):
    """Megatron's "f": identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class TPModel(nn.Module):
    """What the test models share: the seed, the embedding sharded by vocabulary, all-reduces."""

    def __init__(self, spec: ModelSpec, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.spec, self.group = spec, group
        self.tp, self.rank = dist.get_world_size(group), dist.get_rank(group)
        assert spec.heads % self.tp == 0
        self.head_dim, self.local_heads = spec.hidden // spec.heads, spec.heads // self.tp
        torch.manual_seed(0)
        # Uneven vocab shards where TP does not divide the vocab (128 at TP 3: 43, 43, 42 rows),
        # as HF and DTensor shard it.
        vocab_shards = torch.randn(spec.vocab, spec.hidden).tensor_split(self.tp, 0)
        self.vocab_start = sum(len(shard) for shard in vocab_shards[: self.rank])
        self.embed = nn.Parameter(vocab_shards[self.rank].clone())

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group or dist.group.WORLD
        if self.spec.collective == "autograd":
            return ReduceFromTP.apply(x, group)
        if self.spec.collective == "inplace":
            x = x.clone()
            dist.all_reduce(x, group=group)
            return x
        return funcol.all_reduce(x, "sum", group)

    def column_parallel_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as column-parallel matmuls read it: with autograd collectives, through "f" (its
        gradient's partial sums are all-reduced)."""
        if self.spec.collective != "autograd":
            return x
        return CopyToTP.apply(x, self.group or dist.group.WORLD)

    def embed_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """The input embeddings: the inputs themselves with `prompt_embeds`."""
        if self.spec.prompt_embeds:
            return inputs
        rows = self.embed.shape[0]
        local = inputs - self.vocab_start
        mine = (local >= 0) & (local < rows)
        out = F.embedding(local.clamp(0, rows - 1), self.embed) * mine.unsqueeze(-1).to(
            self.embed.dtype
        )
        return self.all_reduce(out)

    def example_input(self, rows: int, seed: int = 1) -> torch.Tensor:
        """Tokens (or embeddings) for `rows` rows, identical on every rank."""
        g = torch.Generator().manual_seed(seed)
        lead = ((2, rows // 2) if rows % 2 == 0 else (1, rows)) if self.spec.batched else (rows,)
        if self.spec.prompt_embeds:
            return torch.randn(*lead, self.spec.hidden, generator=g).to(self.spec.dtype)
        return torch.randint(0, self.spec.vocab, lead, generator=g)


class TPLlama(TPModel):
    def __init__(self, spec: Spec, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(spec, group)
        h, tp = spec.hidden, self.tp
        assert spec.inter % tp == 0

        def cols(out_features: int, in_features: int) -> nn.Parameter:
            full = torch.randn(out_features, in_features) / in_features**0.5
            return nn.Parameter(full.chunk(tp, 0)[self.rank].clone())

        def rows(out_features: int, in_features: int) -> nn.Parameter:
            full = torch.randn(out_features, in_features) / in_features**0.5
            return nn.Parameter(full.chunk(tp, 1)[self.rank].clone())

        self.layers = nn.ModuleList()
        for _ in range(spec.layers):
            layer = nn.Module()
            layer.input_norm, layer.post_norm = RMSNorm(spec), RMSNorm(spec)
            # q, k, v rows are grouped per head so a chunk holds whole heads
            layer.qkv = nn.ParameterList([cols(h, h) for _ in range(3)])
            layer.o = rows(h, h)
            layer.gate, layer.up, layer.down = (
                cols(spec.inter, h),
                cols(spec.inter, h),
                rows(h, spec.inter),
            )
            self.layers.append(layer)
        self.final_norm = RMSNorm(spec)
        self.scale = torch.tensor(0.05)
        self.to(spec.dtype)

    def norm(self, module: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        out = module(x)
        return static_fp8(out, self.scale, not self.spec.scaled_mm) if self.spec.fp8 else out

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T; an FP8 x goes through a scaled matmul with w quantised per tensor."""
        if x.dtype != FP8:
            return F.linear(x, w)
        w_scale = w.abs().max().float() / 448.0
        w8 = (w.float() / w_scale).to(FP8)
        out = torch._scaled_mm(
            x.reshape(-1, x.shape[-1]), w8.t(), self.scale, w_scale, out_dtype=self.spec.dtype
        )
        return out.reshape(*x.shape[:-1], -1)

    def attention(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = self.column_parallel_input(x)
        q, k, v = (self.linear(x, w) for w in layer.qkv)
        lead = x.shape[:-1]
        seq = x if x.dim() == 3 else x.unsqueeze(0)

        def heads(t: torch.Tensor) -> torch.Tensor:
            t = t if t.dim() == 3 else t.unsqueeze(0)
            return t.reshape(t.shape[0], t.shape[1], self.local_heads, self.head_dim).transpose(
                1, 2
            )

        att = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        att = att.transpose(1, 2).reshape(seq.shape[0], seq.shape[1], -1).reshape(*lead, -1)
        return self.all_reduce(F.linear(att, layer.o))

    def mlp(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = self.column_parallel_input(x)
        return self.all_reduce(
            F.linear(F.silu(self.linear(x, layer.gate)) * self.linear(x, layer.up), layer.down)
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(inputs)
        split = 1 if self.spec.graph_break else len(self.layers)
        hidden, residual = self.run_layers(0, split, hidden, hidden)
        if self.spec.graph_break:  # outside any loop, so Dynamo splits the graph right here
            torch._dynamo.graph_break()
        hidden, residual = self.run_layers(split, len(self.layers), hidden, residual)
        hidden = hidden + residual
        return self.final_norm(hidden) if self.spec.final_norm else hidden

    def run_layers(
        self, start: int, stop: int, hidden: torch.Tensor, residual: torch.Tensor
    ) -> tuple:
        """HF decoder layers: the layer's input is the previous MLP output plus the residual."""
        for i in range(start, stop):
            layer = self.layers[i]
            if i > 0:
                hidden = hidden + residual
                residual = hidden
            hidden = self.attention(layer, self.norm(layer.input_norm, hidden)) + residual
            residual = hidden
            hidden = self.mlp(layer, self.norm(layer.post_norm, hidden))
        return hidden, residual
