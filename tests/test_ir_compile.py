"""Raising + lowering inside a real Inductor compile on CPU: small models with each spelling,
compiled with the pass installed as Inductor's post-grad custom pre pass, give what eager gives,
and the pass really raised."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx.experimental.proxy_tensor import make_fx

from fxsp.ir import lower_ir, raise_ir
from tests.support import (
    BF16,
    E4M3,
    E4M3_FNUZ,
    F16,
    F32,
    counts,
    fp8_div,
    fp8_reciprocal,
    gemma,
    hf,
    hf_down_after,
)
from tests.vllm_standins import register_vllm_standins

register_vllm_standins()


class RaiseAndLower(CustomGraphPass):
    """What the backend does first and last, and nothing in between."""

    def __init__(self) -> None:
        self.raised: dict[str, int] = {}
        self.lowered: dict[str, int] = {}

    def __call__(self, graph: torch.fx.Graph) -> None:
        for rule, n in counts(raise_ir(graph, check=True)).items():
            self.raised[rule] = self.raised.get(rule, 0) + n
        for how, n in lower_ir(graph).items():
            self.lowered[how] = self.lowered.get(how, 0) + n

    def uuid(self) -> str:
        return "fxsp-test-raise-and-lower"


# Compiled code does not round where eager does (bf16 chains stay fp32 inside a kernel, GEMM
# epilogues fuse adds), so outputs agree to a few units in their dtype's last place; an FP8
# output may then land one FP8 step away (relative 2^-3). Inductor's emulate_precision_casts would
# tighten this but fails to compile some of these graphs on torch 2.13 (KeyError in codegen,
# plain torch code too).
TOLERANCE = {
    F32: {"rtol": 1e-5, "atol": 1e-5},
    BF16: {"rtol": 2e-2, "atol": 2e-2},
    F16: {"rtol": 5e-3, "atol": 5e-3},
    E4M3: {"rtol": 2**-3, "atol": 2**-9},
    E4M3_FNUZ: {"rtol": 2**-3, "atol": 2**-8},
}


def compile_and_compare(model, *args, dynamic_rows: bool = False) -> RaiseAndLower:
    """Compile `model` with the pass, check its outputs against eager, return the pass."""
    spy = RaiseAndLower()
    torch._dynamo.reset()
    if dynamic_rows:
        torch._dynamo.mark_dynamic(args[0], 0)
    with inductor_config.patch(post_grad_custom_pre_pass=spy), torch.no_grad():
        want = model(*[a.clone() for a in args])
        got = torch.compile(model, backend="inductor", fullgraph=True)(*[a.clone() for a in args])
    for w, g in zip(
        want if isinstance(want, tuple) else (want,),
        got if isinstance(got, tuple) else (got,),
        strict=True,
    ):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), **TOLERANCE[w.dtype])
    return spy


class HFLlamaBlocks(nn.Module):
    """Pre-norm blocks the HF way: h = h + mlp(norm(h)); final norm."""

    def __init__(
        self, layers: int = 2, hidden: int = 16, dtype: torch.dtype = F32, eps: float = 1e-6
    ):
        super().__init__()
        torch.manual_seed(0)
        self.mlps = nn.ModuleList(
            nn.Linear(hidden, hidden, bias=False, dtype=dtype) for _ in range(layers)
        )
        self.weights = nn.ParameterList(
            nn.Parameter(1 + 0.1 * torch.randn(hidden, dtype=dtype)) for _ in range(layers + 1)
        )
        self.eps = eps

    def forward(self, h):
        residual = h
        for mlp, w in zip(self.mlps, self.weights):
            residual = residual + mlp(hf(self.eps)(residual, w))
        return hf(self.eps)(residual, self.weights[-1]), residual


def test_hf_llama_blocks_bf16():
    model = HFLlamaBlocks(dtype=BF16)
    spy = compile_and_compare(model, torch.randn(6, 16, dtype=BF16))
    # the first norm reads the input; the others follow a residual add
    assert spy.raised == {"raise.rms_norm": 3, "raise.add_rms_norm": 2}
    assert spy.lowered == {"aten": 3}


def test_hf_llama_blocks_dynamic_rows():
    # symbolic row counts; eps stays a constant (with dynamic=True Dynamo would make the float
    # eps a graph input, and a norm with a run-time eps is not raised)
    model = HFLlamaBlocks(dtype=F32, eps=1e-5)
    spy = compile_and_compare(model, torch.randn(6, 16), dynamic_rows=True)
    assert spy.raised == {"raise.rms_norm": 3, "raise.add_rms_norm": 2}
    assert spy.lowered == {"aten": 3}


class TorchNorms(nn.Module):
    """nn.RMSNorm, F.rms_norm without weight, a Gemma-style norm and a down-cast-after norm."""

    def __init__(self, hidden: int = 16, dtype: torch.dtype = F32):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.RMSNorm(hidden, eps=1e-6, dtype=dtype)
        self.proj = nn.Linear(hidden, hidden, bias=False, dtype=dtype)
        self.gemma_w = nn.Parameter(0.1 * torch.randn(hidden, dtype=dtype))

    def forward(self, x):
        a = self.proj(self.norm(x))
        b = F.rms_norm(a, (a.shape[-1],), None, 0.1)
        c = gemma(1e-6)(b, self.gemma_w)
        return hf_down_after(1e-8)(c + x, self.norm.weight)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_torch_norms(dtype):
    spy = compile_and_compare(TorchNorms(dtype=dtype), torch.randn(5, 16, dtype=dtype))
    assert spy.raised == {
        "raise.rms_norm": 3,
        "raise.rms_norm_unweighted": 1,
        "raise.add_rms_norm": 1,
    }


def test_norm_whose_round_trip_torch_2_11_folds():
    """Torch 2.11's joint-graph pass folds `normed.to(fp16).to(fp32)` (the F.rms_norm above,
    up-cast by the Gemma norm) into an fp32 -> fp32 cast before the post-grad passes. Spelled with
    that cast, on any torch, the norm is raised and the raised graph rounds where eager does."""

    def normed(x):
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)

    def folded(x):
        return torch.ops.prims.convert_element_type(normed(x), F32) * 3

    x = torch.randn(5, 16, dtype=F16)
    gm = make_fx(folded)(x)
    assert counts(raise_ir(gm, check=True)) == {"raise.rms_norm_unweighted": 1}
    lower_ir(gm.graph)
    gm.recompile()
    torch.testing.assert_close(gm(x), normed(x).to(F16).float() * 3, rtol=0, atol=0)


class Fp8Model(nn.Module):
    """norm → static FP8 quant, and a quant by reciprocal into the other FP8 dtype."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(1 + 0.1 * torch.randn(hidden, dtype=BF16))
        self.register_buffer("scale", torch.tensor(0.05))

    def forward(self, x):
        q = fp8_div(E4M3)(hf(1e-6)(x, self.w), self.scale)
        q2 = fp8_reciprocal(E4M3_FNUZ)(x * 3, self.scale)
        return q, q2


def test_fp8_quant():
    spy = compile_and_compare(Fp8Model(), 10 * torch.randn(8, 16, dtype=BF16))
    assert spy.raised == {"raise.rms_norm": 1, "raise.static_fp8_quant": 2}


class VllmOps(nn.Module):
    """A layer written with vLLM's ops (stand-ins here)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = nn.Parameter(1 + 0.1 * torch.randn(hidden, dtype=BF16))
        self.w2 = nn.Parameter(1 + 0.1 * torch.randn(hidden, dtype=BF16))
        self.register_buffer("scale", torch.tensor(0.05))

    def forward(self, x, residual):
        normed = torch.empty_like(x)
        torch.ops._C.rms_norm(normed, x, self.w1, 1e-6)
        h = normed * 2  # stands for the attention
        torch.ops._C.fused_add_rms_norm(h, residual, self.w2, 1e-6)  # h ← norm(h + r), r ← h + r
        out, residual = torch.ops.vllm_ir.fused_add_rms_norm(h * 3, residual, self.w1, 1e-5)
        q = torch.empty(out.shape, dtype=E4M3)
        torch.ops._C.static_scaled_fp8_quant(
            q, torch.ops.vllm_ir.rms_norm(out, self.w2, 1e-5), self.scale
        )
        return q, residual


def test_vllm_ops():
    x, residual = torch.randn(6, 16, dtype=BF16), torch.randn(6, 16, dtype=BF16)
    spy = compile_and_compare(VllmOps(), x, residual)
    assert spy.raised == {
        "raise.vllm_c_rms_norm": 1,
        "raise.vllm_c_fused_add_rms_norm": 1,
        "raise.vllm_ir_rms_norm": 1,
        "raise.vllm_ir_fused_add_rms_norm": 1,
        "raise.vllm_c_static_fp8_quant": 1,
    }
    assert spy.lowered == {"aten": 3, "vllm_ir": 2}  # vLLM's IR ops stay vLLM's


class TPBlock(nn.Module):
    """Row-parallel matmuls reduced three ways, each followed by a residual add + norm."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.projs = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(3))
        self.w = nn.Parameter(1 + 0.1 * torch.randn(hidden))

    def forward(self, x):
        group = dist.group.WORLD
        residual = x
        y = funcol.all_reduce(self.projs[0](x), "sum", group)
        residual = residual + y
        z = self.projs[1](hf(1e-6)(residual, self.w))
        dist.all_reduce(z, group=group)
        residual = z + residual
        u = torch.ops.vllm.all_reduce(self.projs[2](hf(1e-6)(residual, self.w)), group.group_name)
        mean = funcol.all_reduce(u, "avg", group)  # never raised
        return hf(1e-6)(residual + mean, self.w)


@pytest.mark.usefixtures("world_of_one")
def test_collectives():
    spy = compile_and_compare(TPBlock(), torch.randn(4, 16))
    assert spy.raised == {
        "raise.c10d_all_reduce": 2,
        "raise.vllm_all_reduce": 1,
        "raise.rms_norm": 3,
        "raise.add_rms_norm": 3,
    }
    assert spy.lowered == {"all_reduce": 3, "aten": 3}


class EverySpelling(nn.Module):
    """One of each norm and quant spelling, in fp16 or bf16: HF, `F.rms_norm` (weight first),
    Gemma, add + norm, vLLM's IR ops, an FP8 quant of a bf16/fp16 value by an fp32 [1] scale."""

    def __init__(self, dtype: torch.dtype, hidden: int = 16):
        super().__init__()
        self.w = nn.Parameter(1 + 0.1 * torch.randn(hidden, dtype=dtype))
        self.register_buffer("scale", torch.tensor([0.05]))

    def forward(self, x, residual):
        a = hf(1e-6)(x, self.w)
        b = F.rms_norm(a * 2, (a.shape[-1],), self.w, 1e-5)
        c = gemma(1e-6)(b + residual, self.w)
        d, residual = torch.ops.vllm_ir.fused_add_rms_norm(c, residual, self.w, 1e-6)
        e = torch.ops.vllm_ir.rms_norm(d * 3, self.w, 1e-5)
        q = (e / self.scale).clamp(-448.0, 448.0).to(E4M3)
        return e, residual, q


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_raise_and_lower_stay_within_plain_inductors_error(dtype):
    """fxsp changes no numerics: compiled with raise + lower, every output is as far from eager
    as plain Inductor's, for random inputs and weights."""
    seeds, errors = range(3), {"plain": [], "fxsp": []}
    for seed in seeds:
        torch.manual_seed(seed)
        model = EverySpelling(dtype)
        args = (torch.randn(7, 16, dtype=dtype), torch.randn(7, 16, dtype=dtype))
        with torch.no_grad():
            want = model(*args)
            for name in errors:
                spy = RaiseAndLower()
                torch._dynamo.reset()
                with inductor_config.patch(
                    post_grad_custom_pre_pass=spy if name == "fxsp" else None, fx_graph_cache=False
                ):  # the pass must run every time
                    got = torch.compile(model, backend="inductor", fullgraph=True)(*args)
                errors[name].append(
                    [(g.float() - w.float()).abs().max().item() for g, w in zip(got, want)]
                )
        assert spy.raised == {
            "raise.rms_norm": 3,
            "raise.add_rms_norm": 1,
            "raise.vllm_ir_rms_norm": 1,
            "raise.vllm_ir_fused_add_rms_norm": 1,
            "raise.static_fp8_quant": 1,
        }
    for output in range(3):
        bar = max(e[output] for e in errors["plain"])
        assert max(e[output] for e in errors["fxsp"]) <= bar, errors
