"""`fxsp.golden`: before/after text of example rewrites, and what keeps the text stable
(group names, floats, kwargs, devices, shapes, other processes).

Regenerate the expected strings with `EXPECTTEST_ACCEPT=1 pytest tests/test_golden.py`, then
read the diff: the text is the spec."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import expecttest
import torch
from torch.fx import Graph, GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

import fxsp
from fxsp import ADD, CAST, MUL, Rule, RuleSet, dims, op, scalar, tensor, through

aten = torch.ops.aten
c10d = torch.ops._c10d_functional


def llama_rms_norm(x, w):
    """LlamaRMSNorm.forward: computes in float32, returns the input's dtype."""
    input_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + 1e-6)
    return w * x.to(input_dtype)


def llama_rms_norm_rule() -> Rule:
    # The input is half precision, so `x` can only bind it behind its float32 cast.
    x32 = through(tensor("x", dtypes={torch.bfloat16, torch.float16}), CAST, name="x32")
    variance = op(aten.mean.dim, op(aten.pow.Tensor_Scalar, x32, 2), dims([-1]), True)
    normed = op(MUL, x32, op(aten.rsqrt.default, op(ADD, variance, scalar("eps", 0.0, 1e-2))))

    def to_rms_norm(b, m):
        hidden = m["x"].meta["val"].shape[-1]
        return b.call(aten.rms_norm.default, m["x"], [hidden], m["w"], m["eps"])

    return Rule("llama_rms_norm", op(MUL, tensor("w"), through(normed, CAST)), to_rms_norm)


def graph_with_collectives() -> GraphModule:
    """Two all-reduces on one group and one on another, written by hand."""
    graph = Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(4, 8)
    outputs = []
    for group in ("tp:ranks[0,1]", "ep:ranks[0,2]", "tp:ranks[0,1]"):
        reduced = graph.call_function(c10d.all_reduce.default, (x, "sum", group))
        outputs.append(graph.call_function(c10d.wait_tensor.default, (reduced,)))
    graph.output(tuple(outputs))
    return GraphModule({}, graph)


class TestGoldenRewrites(expecttest.TestCase):
    def test_llama_rms_norm_before_and_after(self):
        gm = make_fx(llama_rms_norm)(
            torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
        )
        self.assertExpectedInline(
            fxsp.golden(gm),
            """\
%0 = input('x_1')  : bf16[4, 8]
%1 = input('w_1')  : bf16[8]
%2 = aten._to_copy.default(%0, dtype=torch.float32)  : f32[4, 8]
%3 = aten.pow.Tensor_Scalar(%2, 2)  : f32[4, 8]
%4 = aten.mean.dim(%3, [-1], True)  : f32[4, 1]
%5 = aten.add.Tensor(%4, 1e-06)  : f32[4, 1]
%6 = aten.rsqrt.default(%5)  : f32[4, 1]
%7 = aten.mul.Tensor(%2, %6)  : f32[4, 8]
%8 = aten._to_copy.default(%7, dtype=torch.bfloat16)  : bf16[4, 8]
%9 = aten.mul.Tensor(%1, %8)  : bf16[4, 8]
return %9""",
        )
        report = RuleSet("raise", [llama_rms_norm_rule()]).apply(gm, check=True)
        self.assertEqual(report.counts, {"llama_rms_norm": 1})
        self.assertExpectedInline(
            fxsp.golden(gm),
            """\
%0 = input('x_1')  : bf16[4, 8]
%1 = input('w_1')  : bf16[8]
%2 = aten.rms_norm.default(%0, [8], %1, 1e-06)  : bf16[4, 8]
return %2""",
        )

    def test_double_to_add_before_and_after(self):
        gm = make_fx(lambda x: (x * 2).relu() * 2)(torch.randn(3))
        self.assertExpectedInline(
            fxsp.golden(gm),
            """\
%0 = input('x_1')  : f32[3]
%1 = aten.mul.Tensor(%0, 2)  : f32[3]
%2 = aten.relu.default(%1)  : f32[3]
%3 = aten.mul.Tensor(%2, 2)  : f32[3]
return %3""",
        )
        double = Rule(
            "x*2 -> x+x",
            op(aten.mul.Tensor, tensor("x"), 2),
            lambda b, m: b.call(aten.add.Tensor, m["x"], m["x"]),
        )
        RuleSet("double", [double]).apply(gm, check=True)
        self.assertExpectedInline(
            fxsp.golden(gm),
            """\
%0 = input('x_1')  : f32[3]
%1 = aten.add.Tensor(%0, %0)  : f32[3]
%2 = aten.relu.default(%1)  : f32[3]
%3 = aten.add.Tensor(%2, %2)  : f32[3]
return %3""",
        )


class TestGoldenStability(expecttest.TestCase):
    def test_group_names_are_numbered_in_order_of_appearance(self):
        self.assertExpectedInline(
            fxsp.golden(graph_with_collectives()),
            """\
%0 = input('x')  : f32[4, 8]
%1 = _c10d_functional.all_reduce.default(%0, 'sum', G0)
%2 = _c10d_functional.wait_tensor.default(%1)
%3 = _c10d_functional.all_reduce.default(%0, 'sum', G1)
%4 = _c10d_functional.wait_tensor.default(%3)
%5 = _c10d_functional.all_reduce.default(%0, 'sum', G0)
%6 = _c10d_functional.wait_tensor.default(%5)
return (%2, %4, %6)""",
        )

    def test_floats_print_by_repr(self):
        gm = make_fx(lambda x: (x + 1e-6) * 0.1 + 1 / 3 - 1e20)(torch.randn(3))
        self.assertExpectedInline(
            fxsp.golden(gm, shapes=False),
            """\
%0 = input('x_1')
%1 = aten.add.Tensor(%0, 1e-06)
%2 = aten.mul.Tensor(%1, 0.1)
%3 = aten.add.Tensor(%2, 0.3333333333333333)
%4 = aten.sub.Tensor(%3, 1e+20)
return %4""",
        )

    def test_kwargs_sorted_and_devices_hidden(self):
        graph = Graph()
        x = graph.placeholder("x")
        # kwargs written out of order, with a device and layout that must not show.
        graph.output(
            graph.call_function(
                aten._to_copy.default,
                (x,),
                {
                    "memory_format": torch.contiguous_format,
                    "device": torch.device("cpu"),
                    "dtype": torch.float16,
                    "layout": torch.strided,
                },
            )
        )
        graph.output_node().prepend(
            graph.call_function(
                aten.ones.default, ([2],), {"pin_memory": False, "device": torch.device("cpu")}
            )
        )
        self.assertExpectedInline(
            fxsp.golden(graph),
            """\
%0 = input('x')
%1 = aten._to_copy.default(%0, dtype=torch.float16, memory_format=torch.contiguous_format)
%2 = aten.ones.default([2])
return %1""",
        )

    def test_shapes_on_and_off(self):
        gm = make_fx(lambda x: x.sum(0).to(torch.float16))(torch.randn(2, 3))
        self.assertExpectedInline(
            fxsp.golden(gm),
            """\
%0 = input('x_1')  : f32[2, 3]
%1 = aten.sum.dim_IntList(%0, [0])  : f32[3]
%2 = aten._to_copy.default(%1, dtype=torch.float16)  : f16[3]
return %2""",
        )
        self.assertExpectedInline(
            fxsp.golden(gm, shapes=False),
            """\
%0 = input('x_1')
%1 = aten.sum.dim_IntList(%0, [0])
%2 = aten._to_copy.default(%1, dtype=torch.float16)
return %2""",
        )

    def test_multi_output_values(self):
        gm = make_fx(lambda x: x.max(1))(torch.randn(2, 3))
        self.assertExpectedInline(
            fxsp.golden(gm),
            """\
%0 = input('x_1')  : f32[2, 3]
%1 = aten.max.dim(%0, 1)  : (f32[2], i64[2])
%2 = operator.getitem(%1, 0)  : f32[2]
%3 = operator.getitem(%1, 1)  : i64[2]
return (%2, %3)""",
        )

    def test_same_text_in_another_process(self):
        # Anything that leaks ids, hashes or dict order differs between processes.
        script = textwrap.dedent("""
            import sys
            sys.path.insert(0, sys.argv[1])
            import torch
            from torch.fx.experimental.proxy_tensor import make_fx
            import fxsp
            from tests.test_golden import (
                graph_with_collectives, llama_rms_norm, llama_rms_norm_rule)
            gm = make_fx(llama_rms_norm)(torch.randn(4, 8, dtype=torch.bfloat16),
                                         torch.randn(8, dtype=torch.bfloat16))
            before = fxsp.golden(gm)
            fxsp.RuleSet("raise", [llama_rms_norm_rule()]).apply(gm)
            print(before, fxsp.golden(gm), fxsp.golden(graph_with_collectives()), sep="\\n---\\n")
        """)
        root = str(Path(__file__).resolve().parent.parent)
        other = subprocess.run(
            [sys.executable, "-c", script, root],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": "123"},
        ).stdout

        gm = make_fx(llama_rms_norm)(
            torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
        )
        before = fxsp.golden(gm)
        RuleSet("raise", [llama_rms_norm_rule()]).apply(gm)
        texts = [before, fxsp.golden(gm), fxsp.golden(graph_with_collectives())]
        here = "\n---\n".join(texts) + "\n"
        self.assertEqual(other, here)


if __name__ == "__main__":
    expecttest.main()
