"""vLLM's own sequence-parallelism test cases, written again for fxsp on the plain-torch path
(`fxsp.backend`), single process on the fake process group: the same models and the same
assertions as vLLM's tests/compile/passes/distributed/test_sequence_parallelism.py and
test_sequence_parallelism_moe.py. The vLLM-package path of the same cases is in
tests/test_vllm_adapter.py.

vLLM's assertions: every all-reduce → norm site is rewritten (4 of 4), the rewritten graph has 4
reduce-scatters and 4 all-gathers and no all-reduce; in the FP8 model the quant stays after the
local norm, so the all-gathers carry FP8.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsp
from tests.support import AllReduceRMSNormChunkModel, all_reduce, rms_norm
from tests.vllm_standins import register_vllm_standins

register_vllm_standins()

E4M3 = torch.float8_e4m3fn
HIDDEN = 16


def quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 quant as models spell it: x in bf16/fp16, an fp32 [1] scale, the
    division promoting to fp32 by itself."""
    return (x / scale).clamp(-448.0, 448.0).to(E4M3)


class AllReduceRMSNormModel(nn.Module):
    """vLLM's TestAllReduceRMSNormModel: relu, all-reduce, norm; then three times mm,
    all-reduce, add + norm. The last residual is unused."""

    def __init__(self, dtype: torch.dtype, fp8: bool = False, fused_norm_quant: bool = False):
        super().__init__()
        self.w = nn.ParameterList(
            nn.Parameter(torch.rand(HIDDEN, HIDDEN, dtype=dtype) / 4) for _ in range(3)
        )
        self.norm_w = nn.ParameterList(
            nn.Parameter(1 + 0.1 * torch.randn(HIDDEN, dtype=dtype)) for _ in range(4)
        )
        self.register_buffer("scale", torch.tensor([0.05]))
        self.fp8, self.fused_norm_quant, self.dtype = fp8, fused_norm_quant, dtype

    def linear(self, i: int, y: torch.Tensor) -> torch.Tensor:
        if self.fp8:  # vLLM's TestFP8Layer: dequantise, then the matmul
            y = y.to(self.dtype) * self.scale.to(self.dtype)
        return y @ self.w[i]

    def norm(self, i: int, x: torch.Tensor, residual: torch.Tensor | None) -> tuple:
        """Norm i, quantised when the model is FP8 and a linear layer follows."""
        quantised = self.fp8 and i < 3
        if quantised and self.fused_norm_quant:  # what vLLM's fuse_norm_quant pass leaves
            out = torch.empty(x.shape, dtype=E4M3)
            if residual is None:
                torch.ops._C.rms_norm_static_fp8_quant(out, x, self.norm_w[i], self.scale, 1e-6)
                return out, x
            torch.ops._C.fused_add_rms_norm_static_fp8_quant(
                out, x, residual, self.norm_w[i], self.scale, 1e-6
            )
            return out, residual
        h = x if residual is None else x + residual
        y = rms_norm(h, self.norm_w[i])
        return (quant_fp8(y, self.scale) if quantised else y), h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = all_reduce(torch.relu(x))
        y, residual = self.norm(0, h, None)
        for i in range(3):
            y, residual = self.norm(i + 1, all_reduce(self.linear(i, y)), residual)
        return y


def rewrite(
    model: nn.Module, *args: torch.Tensor, dynamic: bool = False
) -> fxsp.compile.report.GraphReport:
    backend = fxsp.backend(None, inner="eager", min_tokens=0)
    for arg in args if dynamic else ():
        torch._dynamo.mark_dynamic(arg, 0)
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args)
    (report,) = backend.reports
    return report


def ops_after(report, name: str) -> int:
    return report.after.count(name + ".default(")


@pytest.fixture(autouse=True)
def world(fake_pg):
    return fake_pg


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sequence_parallelism_pass(dtype, dynamic):
    torch.manual_seed(0)
    report = rewrite(
        AllReduceRMSNormModel(dtype), torch.randn(8 * 16, HIDDEN, dtype=dtype), dynamic=dynamic
    )
    counts = report.counts
    assert (counts["sp.first"], counts["sp.middle"], counts["sp.last"]) == (1, 2, 1)
    assert ops_after(report, "_c10d_functional.reduce_scatter_tensor") == 4
    assert ops_after(report, "_c10d_functional.all_gather_into_tensor") == 4
    assert ops_after(report, "_c10d_functional.all_reduce") == 0


@pytest.mark.parametrize("fused_norm_quant", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sequence_parallelism_pass_fp8(dtype, dynamic, fused_norm_quant):
    """The static FP8 model, its quant spelled as models do or already fused into vLLM's
    norm + quant ops (vLLM's default fusion runs before fxsp): either way the FP8 rules fire and
    three of the four all-gathers carry FP8 bytes."""
    torch.manual_seed(0)
    model = AllReduceRMSNormModel(dtype, fp8=True, fused_norm_quant=fused_norm_quant)
    report = rewrite(model, torch.randn(8 * 16, HIDDEN, dtype=dtype), dynamic=dynamic)
    counts = report.counts
    assert (counts["sp.first_fp8"], counts["sp.middle_fp8"], counts["sp.last"]) == (1, 2, 1), (
        report.explain()
    )
    assert ops_after(report, "_c10d_functional.reduce_scatter_tensor") == 4
    assert ops_after(report, "_c10d_functional.all_gather_into_tensor") == 4
    assert ops_after(report, "_c10d_functional.all_reduce") == 0
    assert report.rewritten.count("aten.view.dtype(") == 6  # FP8 → bytes → FP8, three times


class VllmLayerNormModel(nn.Module):
    """vLLM's LayerNorm models (OPT, GPT-2, BLOOM, Falcon, Phi): `tensor_model_parallel_all_reduce`
    (vLLM's all-reduce op), then the residual add and `nn.LayerNorm`, which calls torch's
    `layer_norm`, with weight and bias; the model's LayerNorms before the quant-free linears."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.w = nn.ParameterList(
            nn.Parameter(torch.rand(HIDDEN, HIDDEN, dtype=dtype) / 4) for _ in range(3)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(HIDDEN, dtype=dtype) for _ in range(4))
        for norm in self.norms:
            nn.init.normal_(norm.bias, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = torch.distributed.group.WORLD.group_name
        residual = torch.ops.vllm.all_reduce(torch.relu(x), group)
        y = self.norms[0](residual)
        for i in range(3):
            residual = residual + torch.ops.vllm.all_reduce(y @ self.w[i], group)
            y = self.norms[i + 1](residual)
        return y


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sequence_parallelism_pass_layer_norm(dtype, dynamic):
    """vLLM's LayerNorm path: the same 4 of 4 sites, in vLLM's own collectives."""
    torch.manual_seed(0)
    model = VllmLayerNormModel(dtype)
    report = rewrite(model, torch.randn(8 * 16 + 3, HIDDEN, dtype=dtype), dynamic=dynamic)
    counts = report.counts
    assert (counts["sp.first"], counts["sp.middle"], counts["sp.last"]) == (1, 2, 1), (
        report.explain()
    )
    assert ops_after(report, "vllm.reduce_scatter") == 4
    assert ops_after(report, "vllm.all_gather") == 4
    assert ops_after(report, "vllm.all_reduce") == 0
    assert report.rewritten.count("fxsp.layer_norm.default(") == 1
    assert report.rewritten.count("fxsp.fused_add_layer_norm.default(") == 3


def test_a_graph_compiled_for_autograd_says_sp_is_off(caplog):
    """vLLM's pass test runs with gradients enabled. A model whose parameters require grad,
    called outside no_grad, compiles a training graph: SP is off, said once per backend at
    WARNING."""
    torch.manual_seed(0)
    model = AllReduceRMSNormModel(torch.bfloat16)
    backend = fxsp.backend(None, inner="eager", min_tokens=0)
    x = torch.randn(32, HIDDEN, dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="fxsp"):
        for _ in range(2):
            torch._dynamo.reset()
            torch.compile(model, backend=backend, fullgraph=True)(x)
    said = [
        r
        for r in caplog.records
        if "sequence parallelism found no site in a graph compiled with autograd" in r.message
    ]
    assert len(said) == 1 and said[0].levelname == "WARNING"
    assert backend.reports and not any(
        n for r in backend.reports for k, n in r.counts.items() if k.startswith("sp.")
    )
    assert all("reduce_scatter" not in r.after for r in backend.reports)
    # The same model under no_grad: every site.
    assert rewrite(model, x).counts["sp.middle"] == 2


# --- vLLM's MoE SP test (test_sequence_parallelism_moe.py) ---------------------------------------


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("spelling", ["vllm", "torch"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("seq_len", [15, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sequence_parallelism_moe_pass(dtype, seq_len, with_residual, spelling, dynamic):
    """vLLM: 1 match, a (padded) reduce-scatter, no all-reduce, no all-gather without a residual
    and 1 with one (the residual leaves the graph whole). fxsp: the same, and the chunk is gone
    in both (vLLM keeps one with a residual)."""
    torch.manual_seed(0)
    model = AllReduceRMSNormChunkModel(dtype, spelling, with_residual)
    x, residual = torch.randn(seq_len, 32, dtype=dtype), torch.randn(seq_len, 32, dtype=dtype)
    report = rewrite(model, x, residual, dynamic=dynamic)
    counts = report.counts
    assert sum(n for name, n in counts.items() if name.startswith("sp.")) == 1
    assert counts["chunk.vllm" if spelling == "vllm" else "chunk.slice"] == 1, report.explain()
    assert ops_after(report, "_c10d_functional.reduce_scatter_tensor") == 1
    assert ops_after(report, "_c10d_functional.all_reduce") == 0
    assert ops_after(report, "_c10d_functional.all_gather_into_tensor") == int(with_residual)
    assert "sequence_parallel_chunk_impl" not in report.after
