"""What several test modules share: the catalogue of model spellings (norms, FP8 quants,
all-reduces) with their inputs, capturing the post-grad graph Inductor hands fxsp, and small TP
models. Test modules import from here, never from one another. Fixtures live in conftest.py,
real gloo worlds in worlds.py, the vLLM op stand-ins in vllm_standins.py."""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import fxsp
from fxsp.testing.tp_llama import RMSNorm, Spec, static_fp8
from tests.vllm_standins import register_vllm_standins

register_vllm_standins()  # the catalogue and the chunk model spell vLLM's ops

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
E4M3, E4M3_FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz
H = 8  # hidden size of every example


# ---------------------------------------------------------------------------------------------
# The spellings. Each factory takes eps (baked in as a constant, as models do) and returns the
# function to compile; tensors are arguments, so tests can feed any dtype.
# ---------------------------------------------------------------------------------------------


def normed(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def hf(eps):  # LlamaRMSNorm: weight * normed.to(input dtype)
    return lambda x, w: w * normed(x, eps).to(x.dtype)


def hf_weight_right(eps):
    return lambda x, w: normed(x, eps).to(x.dtype) * w


def hf_down_after(eps):  # the weight multiply in fp32, one down-cast at the end
    return lambda x, w: (normed(x, eps) * w).to(x.dtype)


def hf_no_weight(eps):
    return lambda x: normed(x, eps).to(x.dtype)


def gemma(eps):  # GemmaRMSNorm: the weight is stored as an offset from 1
    return lambda x, w: (normed(x, eps) * (1.0 + w.float())).type_as(x)


def torch_rms_norm(eps):
    return lambda x, w: F.rms_norm(x, (x.shape[-1],), w, eps)


def torch_rms_norm_no_weight(eps):
    return lambda x: F.rms_norm(x, (x.shape[-1],), None, eps)


def nn_rms_norm(eps):
    """nn.RMSNorm, its weight handed in like every other tensor."""
    module = nn.RMSNorm(H, eps=eps)
    return lambda x, w: torch.func.functional_call(module, {"weight": w}, (x,))


def add_norm(eps):  # h = h + residual; normed = norm(h); h is the next residual
    def block(x, residual, w):
        h = x + residual
        return hf(eps)(h, w), h

    return block


def add_norm_swapped(eps):
    def block(x, residual, w):
        h = residual + x
        return torch_rms_norm(eps)(h, w), h

    return block


def torch_layer_norm(eps):  # F.layer_norm / nn.LayerNorm: weight and bias
    return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, eps)


def torch_layer_norm_no_bias(eps):  # Cohere's and OLMo 2's LayerNorm without bias
    return lambda x, w: F.layer_norm(x, (x.shape[-1],), w, None, eps)


def torch_layer_norm_plain(eps):  # OLMo 1: no weight, no bias
    return lambda x: F.layer_norm(x, (x.shape[-1],), None, None, eps)


def nn_layer_norm(eps):
    module = nn.LayerNorm(H, eps=eps)
    return lambda x, w, b: torch.func.functional_call(module, {"weight": w, "bias": b}, (x,))


def layer_norm_1p(eps):  # Nemotron's LayerNorm1P: the weight is stored as an offset from 1
    return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w + 1, b, eps)


def cohere_layer_norm(eps):  # HF's CohereLayerNorm: two passes in fp32, x - mean twice
    def norm(x, w):
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        variance = (xf - mean).pow(2).mean(-1, keepdim=True)
        return (w.float() * ((xf - mean) * torch.rsqrt(variance + eps))).to(x.dtype)

    return norm


def var_layer_norm(eps):  # hand-written with x.var: the mean and the variance apart
    def norm(x, w, b):
        xf = x.float()
        centred = xf - xf.mean(-1, keepdim=True)
        variance = xf.var(-1, keepdim=True, unbiased=False)
        return (centred * torch.rsqrt(variance + eps) * w + b).to(x.dtype)

    return norm


def add_layer_norm(eps):  # GPT-2 / OPT's residual add, then a LayerNorm with bias
    def block(x, residual, w, b):
        h = residual + x
        return torch_layer_norm(eps)(h, w, b), h

    return block


def vllm_c_rms_norm(eps):
    def norm(x, w):
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x, w, eps)
        return out

    return norm


def vllm_c_fused_add_rms_norm(eps):
    def block(x, residual, w):
        x, residual = x * 1, residual * 1  # intermediates, as in a model
        torch.ops._C.fused_add_rms_norm(x, residual, w, eps)
        return x, residual

    return block


def vllm_ir_rms_norm(eps):
    return lambda x, w: torch.ops.vllm_ir.rms_norm(x, w, eps)


def vllm_ir_fused_add_rms_norm(eps):
    return lambda x, residual, w: torch.ops.vllm_ir.fused_add_rms_norm(x, residual, w, eps)


def fp8_div(fp8):
    bound = torch.finfo(fp8).max
    return lambda x, scale: (x.float() / scale).clamp(min=-bound, max=bound).to(fp8)


def fp8_promoted(fp8):
    """x in bf16/fp16 and an fp32 scale of shape [1] (a 0-d one would not promote): the
    division computes in fp32 without an explicit up-cast."""
    bound = torch.finfo(fp8).max
    return lambda x, scale: (x / scale.reshape(1)).clamp(-bound, bound).to(fp8)


def fp8_reciprocal(fp8):
    bound = torch.finfo(fp8).max
    return lambda x, scale: (x.float() * scale.reciprocal()).clamp(-bound, bound).to(fp8)


def fp8_one_over(fp8):
    bound = torch.finfo(fp8).max
    return lambda x, scale: (x.float() * (1.0 / scale)).clamp(-bound, bound).to(fp8)


def vllm_c_fp8(fp8):
    def quant(x, scale):
        out = torch.empty(x.shape, dtype=fp8, device=x.device)
        torch.ops._C.static_scaled_fp8_quant(out, x, scale)
        return out

    return quant


def funcol_all_reduce(group):
    return lambda x, w: funcol.all_reduce(x @ w, "sum", group) + 1


def dist_all_reduce(group):  # in place: Dynamo rewrites it to the functional op
    def reduce(x, w):
        y = x @ w
        dist.all_reduce(y, group=group)
        return y + 1

    return reduce


def vllm_all_reduce(group):
    return lambda x, w: torch.ops.vllm.all_reduce(x @ w, group.group_name) + 1


@dataclass(frozen=True)
class Spelling:
    """A model spelling, the rule that must raise it, and how to build inputs for it."""

    build: Callable  # eps (norms), fp8 dtype (quants) or process group (collectives) -> fn
    rule: str
    # "xw": x [T, H] and weight [H]; "x"; "xrw": x, residual, weight; "xwb", "xrwb": and a bias;
    # "xs": x and a scale; "xm": x and a matrix
    inputs: str


NORMS = {
    "hf": Spelling(hf, "raise.rms_norm", "xw"),
    "hf_weight_right": Spelling(hf_weight_right, "raise.rms_norm", "xw"),
    "hf_down_after": Spelling(hf_down_after, "raise.rms_norm", "xw"),
    "hf_no_weight": Spelling(hf_no_weight, "raise.rms_norm_unweighted", "x"),
    "gemma": Spelling(gemma, "raise.rms_norm", "xw"),
    "torch_rms_norm": Spelling(torch_rms_norm, "raise.rms_norm", "xw"),
    "torch_rms_norm_no_weight": Spelling(
        torch_rms_norm_no_weight, "raise.rms_norm_unweighted", "x"
    ),
    "nn_rms_norm": Spelling(nn_rms_norm, "raise.rms_norm", "xw"),
    "add_norm": Spelling(add_norm, "raise.add_rms_norm", "xrw"),
    "add_norm_swapped": Spelling(add_norm_swapped, "raise.add_rms_norm", "xrw"),
    "torch_layer_norm": Spelling(torch_layer_norm, "raise.layer_norm", "xwb"),
    "torch_layer_norm_no_bias": Spelling(torch_layer_norm_no_bias, "raise.layer_norm", "xw"),
    "torch_layer_norm_plain": Spelling(torch_layer_norm_plain, "raise.layer_norm_unweighted", "x"),
    "nn_layer_norm": Spelling(nn_layer_norm, "raise.layer_norm", "xwb"),
    "layer_norm_1p": Spelling(layer_norm_1p, "raise.layer_norm", "xwb"),
    "cohere_layer_norm": Spelling(cohere_layer_norm, "raise.layer_norm", "xw"),
    "var_layer_norm": Spelling(var_layer_norm, "raise.layer_norm", "xwb"),
    "add_layer_norm": Spelling(add_layer_norm, "raise.add_layer_norm", "xrwb"),
    "vllm_c_rms_norm": Spelling(vllm_c_rms_norm, "raise.vllm_c_rms_norm", "xw"),
    "vllm_c_fused_add_rms_norm": Spelling(
        vllm_c_fused_add_rms_norm, "raise.vllm_c_fused_add_rms_norm", "xrw"
    ),
    "vllm_ir_rms_norm": Spelling(vllm_ir_rms_norm, "raise.vllm_ir_rms_norm", "xw"),
    "vllm_ir_fused_add_rms_norm": Spelling(
        vllm_ir_fused_add_rms_norm, "raise.vllm_ir_fused_add_rms_norm", "xrw"
    ),
}
QUANTS = {
    "fp8_div": Spelling(fp8_div, "raise.static_fp8_quant", "xs"),
    "fp8_promoted": Spelling(fp8_promoted, "raise.static_fp8_quant", "xs"),
    "fp8_reciprocal": Spelling(fp8_reciprocal, "raise.static_fp8_quant", "xs"),
    "fp8_one_over": Spelling(fp8_one_over, "raise.static_fp8_quant", "xs"),
    "vllm_c_fp8": Spelling(vllm_c_fp8, "raise.vllm_c_static_fp8_quant", "xs"),
}
COLLECTIVES = {
    "funcol_all_reduce": Spelling(funcol_all_reduce, "raise.c10d_all_reduce", "xm"),
    "dist_all_reduce": Spelling(dist_all_reduce, "raise.c10d_all_reduce", "xm"),
    "vllm_all_reduce": Spelling(vllm_all_reduce, "raise.vllm_all_reduce", "xm"),
}


def make_inputs(
    kind: str, dtype: torch.dtype = F32, rows: int = 4, hidden: int = H, seed: int = 0
) -> tuple:
    """Random inputs; weights near 1 and the scale such that some values clamp."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    x = randn(rows, hidden)
    return {
        "x": (x,),
        "xw": (x, 1 + 0.1 * randn(hidden)),
        "xrw": (x, randn(rows, hidden), 1 + 0.1 * randn(hidden)),
        "xwb": (x, 1 + 0.1 * randn(hidden), 0.1 * randn(hidden)),
        "xrwb": (x, randn(rows, hidden), 1 + 0.1 * randn(hidden), 0.1 * randn(hidden)),
        "xs": (100 * x, torch.tensor(0.25)),
        "xm": (x, randn(hidden, hidden)),
    }[kind]


# ---------------------------------------------------------------------------------------------
# Capturing post-grad graphs
# ---------------------------------------------------------------------------------------------


class _Captured(Exception):
    pass


class Capture(CustomGraphPass):
    """Inductor's post-grad custom pre pass that keeps a copy of the graph, then stops the
    compile: the graph fxsp would see, without paying for code generation."""

    def __init__(self) -> None:
        self.gm: GraphModule | None = None

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.gm = copy.deepcopy(graph.owning_module)
        raise _Captured

    def uuid(self) -> None:
        return None


def capture(fn: Callable, *args: torch.Tensor) -> GraphModule:
    """The post-grad (inference) graph Inductor builds for `fn(*args)`. Its placeholders are
    `args` in order."""

    def in_order(*tensors):
        for t in tensors:  # Dynamo adds graph inputs in order of first use
            t.shape  # noqa: B018
        return fn(*tensors)

    spy = Capture()
    torch._dynamo.reset()
    with (
        inductor_config.patch(post_grad_custom_pre_pass=spy, fx_graph_cache=False),
        torch.no_grad(),
        pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="_Captured"),
    ):
        torch.compile(in_order, backend="inductor", fullgraph=True)(*args)
    assert spy.gm is not None
    return spy.gm


def fused_rms_norm_graph(x: torch.Tensor, w: torch.Tensor | None, eps: float | None) -> GraphModule:
    """`aten._fused_rms_norm(x, [H], w, eps)[0]` as a graph of its own: on CPU every tracer
    decomposes it, on CUDA it can stay whole."""
    graph = torch.fx.Graph()
    inputs = [graph.placeholder("x")] + ([graph.placeholder("w")] if w is not None else [])
    fused = graph.call_function(
        torch.ops.aten._fused_rms_norm.default,
        (inputs[0], [x.shape[-1]], inputs[1] if w is not None else None, eps),
    )
    graph.output((graph.call_function(operator.getitem, (fused, 0)),))
    gm = GraphModule({}, graph)
    FakeTensorProp(gm).propagate(*[t for t in (x, w) if t is not None])
    return gm


def counts(reports: list) -> dict:
    return {rule: n for r in reports for rule, n in r.counts.items() if n}


# ---------------------------------------------------------------------------------------------
# Small TP models
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """all_reduce → norm, then per layer: all_reduce(matmul) + residual → norm."""

    def __init__(
        self,
        layers: int = 2,
        hidden: int = 8,
        prompt_embeds: bool = False,
        fp8: bool = False,
        graph_break: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.ParameterList(
            nn.Parameter(torch.randn(hidden, hidden)) for _ in range(layers + 1)
        )
        self.norm_w = nn.ParameterList(nn.Parameter(torch.randn(hidden)) for _ in range(layers + 1))
        self.prompt_embeds, self.fp8, self.graph_break = prompt_embeds, fp8, graph_break

    def norm(self, i: int, x: torch.Tensor) -> torch.Tensor:
        out = self.norm_w[i] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        return static_fp8(out, torch.tensor(0.5)) if self.fp8 and i < len(self.w) - 1 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.prompt_embeds else funcol.all_reduce(x @ self.w[0], "sum", dist.group.WORLD)
        split = 2 if self.graph_break else len(self.w)
        out, residual = self.layers(1, split, self.norm(0, h), h)
        if self.graph_break:  # outside any loop, so Dynamo splits the graph right here
            torch._dynamo.graph_break()
        return self.layers(split, len(self.w), out, residual)[0]

    def layers(self, start: int, stop: int, out: torch.Tensor, residual: torch.Tensor) -> tuple:
        for i in range(start, stop):
            residual = funcol.all_reduce(out @ self.w[i], "sum", dist.group.WORLD) + residual
            out = self.norm(i, residual)
        return out, residual


# vLLM's SP test models: the pieces they share, and the one test_moe.py runs too (the rest are
# in test_vllm_sp_cases.py).


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF/Llama's RMSNorm."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def sequence_parallel_chunk(x: torch.Tensor, spelling: str) -> torch.Tensor:
    """This rank's block of x's rows, padded to a multiple of the TP size: vLLM's op, or plain
    torch (F.pad + narrow)."""
    if spelling == "vllm":
        return torch.ops.vllm.sequence_parallel_chunk_impl(x)
    tp, rank = dist.get_world_size(), dist.get_rank()
    padded = torch.nn.functional.pad(x, (0, 0, 0, -x.shape[0] % tp))
    per_rank = padded.shape[0] // tp
    return torch.narrow(padded, 0, rank * per_rank, per_rank)


class AllReduceRMSNormChunkModel(nn.Module):
    """vLLM's TestAllReduceRMSNormChunkModel / TestAllReduceFusedAddRMSNormChunkModel: relu,
    all-reduce, (add +) norm, then this rank's chunk of the normed rows (the residual, if any,
    is returned whole)."""

    def __init__(self, dtype: torch.dtype, spelling: str, with_residual: bool, hidden: int = 32):
        super().__init__()
        self.w = nn.Parameter(1 + 0.1 * torch.randn(hidden, dtype=dtype))
        self.spelling, self.with_residual = spelling, with_residual

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | tuple:
        y = all_reduce(torch.relu(x))
        if self.with_residual:
            y = residual = y + torch.sigmoid(residual)
        y = sequence_parallel_chunk(rms_norm(y, self.w, 1e-5), self.spelling)
        return (y, residual) if self.with_residual else y


def last_op(fn, *shapes):
    """The last op node of fn's ATen graph (with fake-tensor meta; a getitem of it is not one),
    and the graph's inputs."""
    gm = make_fx(fn, tracing_mode="fake")(*(torch.randn(s) for s in shapes))
    ops = [
        n for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem
    ]
    return ops[-1], list(gm.graph.find_nodes(op="placeholder"))


class RowwiseStack(nn.Module):
    """all_reduce(x @ w0), `embed`-ed, → norm; then per layer
    residual + `between`(all_reduce(norm(residual) @ w_i)) → norm.

    embed: "granite" (× 12.0), "gemma" (× √H as a tensor), "input" (no all-reduce: x is the
    first norm's input and the residual, as with prompt embeddings), or None.
    between: "granite" (× 0.22), "moe" (the all-reduce on flattened [T, H] rows, viewed back
    to the residual's shape), "clone", or a row-mixing op: "cumsum", "softmax", "token_mean",
    "token_mm" (a [T, T] matrix times the rows); or None.
    """

    def __init__(
        self,
        embed: str | None = None,
        between: str | None = None,
        layers: int = 2,
        hidden: int = 8,
        tokens: int = 5,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.between = embed, between
        self.w = nn.ParameterList(
            nn.Parameter(torch.randn(hidden, hidden) / hidden) for _ in range(layers + 1)
        )
        self.norm_w = nn.ParameterList(nn.Parameter(torch.randn(hidden)) for _ in range(layers + 1))
        self.mix = nn.Parameter(torch.randn(tokens, tokens))  # "token_mm" only

    def norm(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.norm_w[i] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.embed == "input" else all_reduce(x @ self.w[0])
        if self.embed == "granite":
            h = h * 12.0
        elif self.embed == "gemma":
            h = h * torch.tensor(math.sqrt(h.shape[-1]), dtype=h.dtype)
        out, residual = self.norm(0, h), h
        for i in range(1, len(self.w)):
            y = all_reduce(out.reshape(-1, out.shape[-1]) @ self.w[i])
            residual = residual + self.op_between(y).view(residual.shape)
            out = self.norm(i, residual)
        return out

    def op_between(self, y: torch.Tensor) -> torch.Tensor:
        kind = self.between
        if kind == "granite":
            return y * 0.22
        if kind == "clone":
            return y.clone()
        if kind == "cumsum":
            return y.cumsum(0)
        if kind == "softmax":
            return torch.softmax(y, 0)
        if kind == "token_mean":
            return y - y.mean(0, keepdim=True)
        if kind == "token_mm":
            return self.mix @ y
        return y  # None and "moe": the view back to the residual's shape does the rest


class MLPStack(nn.Module):
    """Three RMSNorms around two residual MLPs (hidden 16, inner 24), plain `nn.Linear`s: the
    model `dtensor_mlp` shards with DTensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norms = nn.ModuleList(RMSNorm(Spec(hidden=16)) for _ in range(3))
        self.up = nn.ModuleList(nn.Linear(16, 24, bias=False) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(24, 16, bias=False) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for norm, up, down in zip(self.norms, self.up, self.down):
            residual = residual + down(torch.relu(up(norm(residual))))
        return self.norms[-1](residual)


def dtensor_mlp() -> tuple:
    """(an MLPStack parallelised with DTensor's ColwiseParallel / RowwiseParallel, its 1-D CPU
    mesh over the default group)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plan = {f"up.{i}": ColwiseParallel() for i in range(2)} | {
        f"down.{i}": RowwiseParallel() for i in range(2)
    }
    return parallelize_module(MLPStack(), mesh, plan), mesh


def compile_reports(model: nn.Module, x: torch.Tensor, dynamic: bool = False, **options) -> list:
    """fxsp's reports of one compile of `model` on `x` (`inner="eager"` unless given: the graph
    after the rewrite and clean-up, IR ops not yet lowered), for golden tests on the fake group."""
    backend = fxsp.backend(None, **{"inner": "eager", **options})
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
    return backend.reports
