"""The SP rewrite written the way vLLM writes it: Inductor's pattern matcher, traced patterns.

    sp = PatternMatcherSP(group="0", world=2, rank=0)   # traces and registers the patterns
    matches = sp.apply(graph_module)                     # then graph_module.recompile() to run it

The baseline of benchmarks/sp_pass_speed.py. It rewrites what fxsp's SP rules rewrite
(fxsp/sp/rules.py), the way vLLM's `SequenceParallelismPass` does: one
`torch._inductor.pattern_matcher.register_replacement(pattern, replacement, example_inputs,
fwd_only, pass)` per variant, epsilon and dtype, patterns traced under a fake mode.

Which graph level, and why that is the fair comparison: vLLM's patterns match its own IR-like
ops (`vllm_ir.rms_norm`, `vllm_ir.fused_add_rms_norm`, `vllm.all_reduce`), which its models emit
directly; fxsp's SP rules match fxsp's IR ops, which its raising pass makes out of whatever
spelling the model used. So both engines get the same IR graph here, with one op per concept,
and the difference measured is the matching engine itself (patterns traced from functions and a
re-trace of pattern and replacement per match, against patterns as data). On raw ATen the
baseline would need a registration per spelling as well (HF or `F.rms_norm` style, casts per
dtype): slower still, for work fxsp does once in its raising pass, which is not measured.

Registered, per epsilon in (1e-5, 1e-6) and per model dtype (fp32, bf16), as in vLLM:

    first       rms_norm(all_reduce(x))                      -> (normed, all_reduce)
    middle      fused_add_rms_norm(all_reduce(x), residual)  -> (normed, residual_out)
    last        the same, normed only (the residual output is dead: the final norm)
    *_fp8       the same followed by static_fp8_quant; the all-gather carries the FP8 bytes

12 `register_replacement` calls per dtype, 24 in all. On the IR level a dtype leaves no trace
in the pattern (no casts), so the bf16 ones trace to the fp32 patterns and Inductor drops them
as duplicates (`skip_duplicates=True`) after tracing them: their cost is what a pass serving
both dtypes pays. An epsilon other than these two is silently not matched.

Residuals, as in vLLM: Inductor's matcher visits anchors from the end of the graph, so when a
middle norm is replaced its residual is still full size; the replacement takes rows [0:L] and
hands out the *sharded* residual output. Once the norm before it is replaced as well, that slice
is a no-op, and a clean-up after the pass removes it (vLLM's NoOpElimination). The graph is
only right once every norm in a chain matched. vLLM's [0:L] was wrong on every rank but 0 where
the residual stays replicated (prompt embeddings: no first all-reduce); the clean-up here gives
such slices this rank's offset, which is the fix. Rows must divide by the TP size: vLLM pads the
batch in its model runner, this baseline has no padding.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.pattern_matcher as pm
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule

import fxsp.ir.ops  # noqa: F401 - defines torch.ops.fxsp

ir, c10d, aten = torch.ops.fxsp, torch.ops._c10d_functional, torch.ops.aten

EPSILONS = (1e-5, 1e-6)
DTYPES = (torch.float32, torch.bfloat16)
FP8 = torch.float8_e4m3fn


class PatternMatcherSP:
    """SP over the process group named `group` of `world` ranks, for this `rank`."""

    def __init__(
        self, group: str, world: int, rank: int, epsilons: tuple = EPSILONS, dtypes: tuple = DTYPES
    ) -> None:
        self.group, self.world, self.rank = group, world, rank
        self.patterns = pm.PatternMatcherPass(pass_name="baseline_sequence_parallelism")
        self.registrations = 0  # register_replacement calls
        self.distinct = 0  # of which Inductor kept (not duplicates)
        # Traced under a fake mode, as vLLM and Inductor register theirs: nothing runs.
        with torch._guards.tracing(None), FakeTensorMode():
            for dtype in dtypes:
                for eps in epsilons:
                    self._register_all(eps, dtype)

    def apply(self, gm: GraphModule) -> int:
        """Rewrite every match in `gm`'s graph; returns the number of matches. (The Python code
        is not regenerated, as fxsp's `RuleSet.apply(graph)` does not: the pass alone is timed.)"""
        matches = self.patterns.apply(gm)
        _settle_residual_slices(gm.graph, self.rank)
        return matches

    # --- collectives ---------------------------------------------------------------------------

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return ir.all_reduce(x, self.group, "c10d")

    def _reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        return c10d.wait_tensor(c10d.reduce_scatter_tensor(x, "sum", self.world, self.group))

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == FP8:  # gloo has no FP8: the same bytes as uint8
            return self._all_gather(x.view(torch.uint8)).view(FP8)
        return c10d.wait_tensor(c10d.all_gather_into_tensor(x, self.world, self.group))

    # --- patterns ------------------------------------------------------------------------------

    def _register(self, pattern: Callable, replacement: Callable, inputs: list) -> None:
        self.registrations += 1
        kept = pm.register_replacement(
            pattern, replacement, inputs, pm.fwd_only, self.patterns, skip_duplicates=True
        )
        self.distinct += bool(kept)

    def _register_all(self, eps: float, dtype: torch.dtype) -> None:
        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=dtype)

        x, residual, weight, scale = (
            empty(8, 4),
            empty(8, 4),
            empty(4),
            torch.empty(1, dtype=torch.float32),
        )

        def first(x, weight):
            reduced = self._all_reduce(x)
            return ir.rms_norm(reduced, weight, eps), reduced

        def first_sp(x, weight):
            scattered = self._reduce_scatter(x)
            return self._all_gather(ir.rms_norm(scattered, weight, eps)), scattered

        def first_fp8(x, weight, scale):
            reduced = self._all_reduce(x)
            return ir.static_fp8_quant(ir.rms_norm(reduced, weight, eps), scale, FP8), reduced

        def first_fp8_sp(x, weight, scale):
            scattered = self._reduce_scatter(x)
            quant = ir.static_fp8_quant(ir.rms_norm(scattered, weight, eps), scale, FP8)
            return self._all_gather(quant), scattered

        def middle(residual, x, weight):
            return ir.fused_add_rms_norm(self._all_reduce(x), residual, weight, eps)

        def middle_sp(residual, x, weight):
            scattered = self._reduce_scatter(x)
            # Full size until the norm before this one is replaced too (see the docstring).
            rows = residual[0 : scattered.size(0)]
            normed, residual_out = ir.fused_add_rms_norm(scattered, rows, weight, eps)
            return self._all_gather(normed), residual_out

        def middle_fp8(residual, x, weight, scale):
            normed, residual_out = middle(residual, x, weight)
            return ir.static_fp8_quant(normed, scale, FP8), residual_out

        def middle_fp8_sp(residual, x, weight, scale):
            scattered = self._reduce_scatter(x)
            rows = residual[0 : scattered.size(0)]
            normed, residual_out = ir.fused_add_rms_norm(scattered, rows, weight, eps)
            return self._all_gather(ir.static_fp8_quant(normed, scale, FP8)), residual_out

        self._register(first_fp8, first_fp8_sp, [x, weight, scale])
        self._register(middle_fp8, middle_fp8_sp, [residual, x, weight, scale])
        self._register(
            _first_output(middle_fp8), _first_output(middle_fp8_sp), [residual, x, weight, scale]
        )
        self._register(first, first_sp, [x, weight])
        self._register(middle, middle_sp, [residual, x, weight])
        self._register(_first_output(middle), _first_output(middle_sp), [residual, x, weight])


def _first_output(fn: Callable) -> Callable:
    """The pattern (or replacement) for a norm whose residual output is dead."""

    @functools.wraps(fn)
    def first(*args: Any) -> torch.Tensor:
        return fn(*args)[0]

    return first


def _settle_residual_slices(graph: Graph, rank: int) -> None:
    """After the pass: a residual slice [0:L] whose input became sharded (L rows) is a no-op
    and goes; one whose input stayed replicated (full rows) takes this rank's rows."""
    for norm in graph.find_nodes(op="call_function", target=ir.fused_add_rms_norm.default):
        rows = norm.args[1]
        if rows.target is not aten.slice.Tensor or rows.args[1:3] != (0, 0):
            continue
        source, length = rows.args[0], rows.args[3]
        source_rows = source.meta["val"].shape[0]
        if source_rows == length:
            rows.replace_all_uses_with(source)
            graph.erase_node(rows)
        else:
            rows.args = (source, 0, rank * length, (rank + 1) * length)


# ---------------------------------------------------------------------------------------------
# On raw post-grad graphs: the decomposed norms and the functional all-reduce
# ---------------------------------------------------------------------------------------------


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF/Llama's RMSNorm (fxsp.testing.tp_llama's "hf" spelling)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(dtype) * xf.to(dtype)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.rms_norm` (fxsp.testing.tp_llama's "torch" spelling) as its decomposition spells it
    in a post-grad graph: traced as it is, `fwd_only` records an in-place `add_` (it does not
    functionalize) and the pattern would never match. eps is rounded to fp32 and added as a
    Scalar, as there."""
    xf = x.float()
    eps32 = struct.unpack("f", struct.pack("f", eps))[0]
    normed = xf * torch.rsqrt(aten.add.Scalar(xf.pow(2).mean(x.dim() - 1, keepdim=True), eps32))
    return (normed * weight).to(x.dtype)


NORMS = {"hf": hf_rms_norm, "torch": torch_rms_norm}


class RawPatternMatcherSP(PatternMatcherSP):
    """The same SP rewrite on the raw post-grad graph, where a norm is the decomposed spelling
    the model wrote and an all-reduce is `wait_tensor(_c10d_functional.all_reduce(x, "sum", g))`:
    what vLLM's pass would need without an IR, one registration per norm spelling, epsilon and
    dtype for first / middle / last (12 per spelling, `norm` one of NORMS). No FP8 variants."""

    def __init__(
        self,
        group: str,
        world: int,
        rank: int,
        norm: str = "hf",
        epsilons: tuple = EPSILONS,
        dtypes: tuple = DTYPES,
    ) -> None:
        self.norm = NORMS[norm]
        super().__init__(group, world, rank, epsilons, dtypes)

    def apply(self, gm: GraphModule) -> int:
        matches = self.patterns.apply(gm)
        _settle_raw_residual_slices(gm.graph, self.rank)
        return matches

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return c10d.wait_tensor(c10d.all_reduce(x, "sum", self.group))

    def _register_all(self, eps: float, dtype: torch.dtype) -> None:
        norm = self.norm
        x, residual, weight = (
            torch.empty(8, 4, dtype=dtype),
            torch.empty(8, 4, dtype=dtype),
            torch.empty(4, dtype=dtype),
        )

        def first(x, weight):
            reduced = self._all_reduce(x)
            return norm(reduced, weight, eps), reduced

        def first_sp(x, weight):
            scattered = self._reduce_scatter(x)
            return self._all_gather(norm(scattered, weight, eps)), scattered

        def middle(residual, x, weight):
            summed = self._all_reduce(x) + residual
            return norm(summed, weight, eps), summed

        def middle_sp(residual, x, weight):
            scattered = self._reduce_scatter(x)
            # Full size until the norm before this one is replaced too (see the docstring).
            summed = scattered + residual[0 : scattered.size(0)]
            return self._all_gather(norm(summed, weight, eps)), summed

        self._register(first, first_sp, [x, weight])
        self._register(middle, middle_sp, [residual, x, weight])
        self._register(_first_output(middle), _first_output(middle_sp), [residual, x, weight])


def _settle_raw_residual_slices(graph: Graph, rank: int) -> None:
    """`_settle_residual_slices` for the raw graph: the slice is the second operand of the add
    of a reduce-scatter's result and the residual."""
    for add in graph.find_nodes(op="call_function", target=aten.add.Tensor):
        scattered, rows = add.args[:2]
        if not (
            isinstance(scattered, torch.fx.Node)
            and scattered.target is c10d.wait_tensor.default
            and scattered.args[0].target is c10d.reduce_scatter_tensor.default
            and isinstance(rows, torch.fx.Node)
            and rows.target is aten.slice.Tensor
            and rows.args[1:3] == (0, 0)
        ):
            continue
        source, length = rows.args[0], rows.args[3]
        if source.meta["val"].shape[0] == length:
            rows.replace_all_uses_with(source)
            graph.erase_node(rows)
        else:
            rows.args = (source, 0, rank * length, (rank + 1) * length)
