"""`acts_per_row`: which ops keep each row to itself, judged on make_fx graphs' meta shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fxsp.sp.rowwise import acts_per_row
from tests.support import last_op

T, H = 6, 8


ROW_WISE = {
    "scalar_multiplier": (lambda x: x * 0.22, [(T, H)]),
    "embedding_scale_tensor": (lambda x: x * torch.tensor(H**0.5), [(T, H)]),
    "per_feature_weight": (lambda x, w: x * w, [(T, H), (H,)]),
    "per_feature_weight_1h": (lambda x, w: w + x, [(1, T, H), (1, 1, H)]),
    "unary": (lambda x: F.silu(x), [(T, H)]),
    "cast": (lambda x: x.to(torch.bfloat16), [(T, H)]),
    "to_copy": (lambda x: torch.ops.aten._to_copy.default(x, dtype=torch.float16), [(T, H)]),
    "clone": (lambda x: x.clone(), [(T, H)]),
    "to_batch": (lambda x: x.reshape(1, T, H), [(T, H)]),
    "unsqueeze": (lambda x: x.unsqueeze(0), [(T, H)]),
    "batched_to_tokens": (lambda x: x.view(T, H), [(2, T // 2, H)]),
    "tokens_to_batched": (lambda x: x.view(3, T // 3, H), [(T, H)]),
    "squeeze": (lambda x: x.squeeze(0), [(1, T, H)]),
    "mean_over_hidden": (lambda x: x.mean(-1, keepdim=True), [(T, H)]),
    "softmax_over_hidden": (lambda x: torch.softmax(x, -1), [(2, T, H)]),
}

# name: (fn, input shapes, text the reason must contain[, the input that is the rows value])
NOT_ROW_WISE = {
    "softmax_over_tokens": (lambda x: torch.softmax(x, 0), [(T, H)], "across the token dims"),
    "cumsum_over_tokens": (lambda x: x.cumsum(0), [(T, H)], "across the token dims"),
    "sum_over_tokens": (lambda x: x.sum(0, keepdim=True), [(T, H)], "across the token dims"),
    "mean_over_sequence": (lambda x: x.mean(1), [(2, T, H)], "across the token dims"),
    "full_sum": (lambda x: x.sum(), [(T, H)], "every dim"),
    "attention_scores": (lambda x: x @ x.t(), [(T, H)], "contracts over the hidden dim"),
    "contract_over_tokens": (
        lambda x, y: torch.ops.aten.mm.default(y, x),
        [(T, H), (H, T)],
        "contracts over the token dim",
        0,
    ),
    "bmm_over_tokens": (
        lambda x, y: torch.bmm(y, x),
        [(1, T, H), (1, H, T)],
        "contracts over the token dim",
        0,
    ),
    "sdpa": (lambda x: F.scaled_dot_product_attention(x, x, x), [(1, 2, T, H)], "may mix rows"),
    "split_hidden": (lambda x: x.view(T, 2, H // 2), [(T, H)], "mixes rows and hidden"),
    "flatten": (lambda x: x.reshape(-1), [(T, H)], "mixes rows and hidden"),
    "transpose": (lambda x: x.transpose(0, 1), [(2, T, H)], "may mix rows"),
    "other_operand_with_rows": (lambda x, y: x + y, [(T, H), (T, H)], "has rows of its own"),
    "per_row_scale": (lambda x, s: x * s, [(T, H), (T, 1)], "has rows of its own"),
    "broadcast_up": (
        lambda x, y: x + y,
        [(1, H), (T, H)],
        "broadcasts its input [1, 8] to [6, 8]",
        0,
    ),
    "dropout_in_training": (
        lambda x: torch.ops.aten.native_dropout.default(x, 0.1, True)[0],
        [(T, H)],
        "random numbers",
    ),
}


@pytest.mark.parametrize("name", sorted(ROW_WISE))
def test_row_wise(name):
    fn, shapes = ROW_WISE[name]
    node, _ = last_op(fn, *shapes)
    assert acts_per_row(node) is True, (node.format_node(), acts_per_row(node))


@pytest.mark.parametrize("name", sorted(NOT_ROW_WISE))
def test_not_row_wise(name):
    fn, shapes, reason, *rows = NOT_ROW_WISE[name]
    node, inputs = last_op(fn, *shapes)
    verdict = acts_per_row(node, *(inputs[i] for i in rows))
    assert isinstance(verdict, str) and reason in verdict, (node.format_node(), verdict)


def test_the_rows_operand_is_the_one_of_the_result_shape():
    node, (w, x) = last_op(lambda w, x: w * x, (H,), (T, H))
    assert acts_per_row(node) is True and acts_per_row(node, rows=x) is True
    assert "has no rows" in acts_per_row(node, rows=w)


def test_cast_to_another_device_is_not_row_wise():
    node, _ = last_op(lambda x: x.to("meta"), (T, H))
    assert "moves the value" in acts_per_row(node)


def test_symbolic_rows():
    gm = make_fx(lambda x: (x * 2.0).view(1, -1, H), tracing_mode="symbolic")(torch.randn(T, H))
    mul, view = [
        n for n in gm.graph.nodes if n.op == "call_function" and "sym_size" not in str(n.target)
    ]
    assert acts_per_row(mul) is True and acts_per_row(view) is True
