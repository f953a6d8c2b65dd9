"""Lowering: fxsp IR ops back to what Inductor compiles, after the rewrite passes.

    lower_ir(graph)                       # every IR node, provider kernel or reference
    lower_ir(graph, providers=())         # reference decompositions only

Each norm / quant node is lowered to the spelling it was raised from (`ops.SPELLING`): vLLM's
`vllm_ir` ops stay `vllm_ir` ops (vLLM lowers them to its chosen kernels after fxsp), and the
others become either a registered provider's kernel (`providers.choose`, only for the op's own
numerics; the provider's op has the IR op's signature, so a plain custom op just becomes the
node's target, while a `torch.library.triton_op` is spliced in as AOT autograd would have traced
it, its kernel launch as Triton's kernel HOP that Inductor calls from its own code) or, by
default and always on CPU, the reference implementation of that spelling from `ops.py` traced to
ATen with the node's own fake inputs and inlined in its place. A reference is traced once per
(reference, inputs' metadata, other arguments) and graph, and that template stamped at every
node that shares the key: an 80-layer model traces its norms twice, not 161 times (a provider's
traced op is kept and stamped the same way). Traced with
Inductor's decomposition table, the inlined nodes
are spelled as Inductor's post-grad graphs are, so Inductor fuses them into neighbouring kernels
(and raising them again gives the same IR op back). `fxsp.all_reduce` becomes the collective of
its flavor (`fxsp/ir/collectives.py`). IR ops defined in other modules (`fused_ops.py`) join through
`register_reference` and are lowered the same way.
"""

from __future__ import annotations

import contextlib
import operator
import re
from collections.abc import Callable
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.node import map_arg
from torch.utils._pytree import tree_map

from ..dsl.builder import Builder, create_call, erase_unused, has_raw_symbolic
from ..dsl.fake import _key, fake_value, fresh_like, tensor_of
from . import ops
from .collectives import all_reduce_sum
from .providers import choose

REFERENCES = {
    ops.RMS_NORM: ops.rms_norm_reference,
    ops.FUSED_ADD_RMS_NORM: ops.fused_add_rms_norm_reference,
    ops.LAYER_NORM: ops.layer_norm_reference,
    ops.FUSED_ADD_LAYER_NORM: ops.fused_add_layer_norm_reference,
    ops.STATIC_FP8_QUANT: ops.static_fp8_quant_reference,
}
# Spellings whose numerics differ from the op's own: (op, spelling) -> their reference.
SPELLED_REFERENCES = {
    (ops.RMS_NORM, ops.WEIGHT_FIRST): ops.rms_norm_weight_first,
    (ops.FUSED_ADD_RMS_NORM, ops.WEIGHT_FIRST): ops.fused_add_rms_norm_weight_first,
    (ops.LAYER_NORM, ops.TWO_PASS): ops.layer_norm_two_pass,
    (ops.FUSED_ADD_LAYER_NORM, ops.TWO_PASS): ops.fused_add_layer_norm_two_pass,
    (ops.LAYER_NORM, ops.MEAN_THEN_VAR): ops.layer_norm_mean_then_var,
    (ops.FUSED_ADD_LAYER_NORM, ops.MEAN_THEN_VAR): ops.fused_add_layer_norm_mean_then_var,
    (ops.STATIC_FP8_QUANT, ops.RECIPROCAL): ops.static_fp8_quant_reciprocal,
}
# Spellings that are the op's own numerics: providers' kernels may replace them.
OWN_NUMERICS = (None, ops.HF, ops.DIVIDE)


def register_reference(op: Any, reference: Callable) -> None:
    """Make `lower_ir` lower `op`, an IR op defined outside `ops.py` (e.g. `fused_ops.py`), like
    the core ones: a provider's kernel, or else `reference` traced to ATen and inlined."""
    REFERENCES[op] = reference


def lower_ir(
    target: Graph | GraphModule, providers: tuple[str, ...] | None = None
) -> dict[str, int]:
    """Replace every fxsp IR node in `target`. `providers` limits the kernel providers that may
    be chosen (None: any registered one; (): reference decompositions only).

    Returns how many nodes went where, e.g. {"aten": 4, "all_reduce": 2}.
    """
    graph = target.graph if isinstance(target, GraphModule) else target
    counts: dict[str, int] = {}
    lowered = {*ops.IR_OPS, *REFERENCES}
    templates: dict = {}
    found = {
        n
        for target in lowered
        for n in graph.find_nodes(op="call_function", target=target, sort=False)
    }
    for node in sorted(found):  # in graph order, as a walk would find them
        how = _lower(graph, node, providers, templates)
        counts[how] = counts.get(how, 0) + 1
    if isinstance(target, GraphModule):
        target.recompile()
    return counts


def _lower(graph: Graph, node: Node, providers: tuple[str, ...] | None, templates: dict) -> str:
    if node.target is ops.ALL_REDUCE:
        x, group, flavor = node.args
        _replace(node, all_reduce_sum(Builder(graph), x, group, flavor))
        return "all_reduce"
    spelling = ops.spelling_of(node)
    if spelling in (ops.VLLM_IR, ops.VLLM_IR_FUSED):
        _emit_vllm_ir(graph, node, spelling)
        return "vllm_ir"
    if spelling in OWN_NUMERICS:
        first = _val(node.args[0])
        provider = choose(node.target, first.device.type, first.dtype, allowed=providers)
        if provider is not None:
            _call_provider(graph, node, provider.impls[node.target], templates)
            return provider.name
    _inline_reference(graph, node, reference_of(node.target, spelling), templates)
    return "aten"


def reference_of(target: Any, spelling: str | None) -> Callable:
    """The plain-torch reference of IR op `target` as `spelling` computes it."""
    return SPELLED_REFERENCES.get((target, spelling)) or REFERENCES[target]


def _emit_vllm_ir(graph: Graph, node: Node, spelling: str) -> None:
    """vLLM's own op again, on the node's (possibly sharded) inputs. A fused add raised from a
    plain add + `vllm_ir.rms_norm` keeps its add: it rounds the sum before the norm."""
    b = Builder(graph)
    vllm_ir = torch.ops.vllm_ir
    if node.target is ops.RMS_NORM:
        _replace(node, _same_dtype(b, b.call(vllm_ir.rms_norm.default, *node.args), node))
        return
    x, residual, weight, eps = node.args
    if spelling == ops.VLLM_IR_FUSED:
        fused = b.call(vllm_ir.fused_add_rms_norm.default, x, residual, weight, eps)
        out, residual_out = (b.call(operator.getitem, fused, i) for i in (0, 1))
    else:
        residual_out = b.call(torch.ops.aten.add.Tensor, x, residual)
        out = b.call(vllm_ir.rms_norm.default, residual_out, weight, eps)
    _replace(node, (_same_dtype(b, out, node, 0), residual_out))


def _same_dtype(b: Builder, value: Node, node: Node, index: int | None = None) -> Node:
    """`value` cast to the dtype the IR node promised (vLLM's ops return x's dtype)."""
    want = node.meta["val"] if index is None else node.meta["val"][index]
    if tensor_of(value).dtype == want.dtype:
        return value
    return b.call(torch.ops.prims.convert_element_type.default, value, want.dtype)


def _inline_reference(graph: Graph, node: Node, reference: Callable, templates: dict) -> None:
    """Replace `node` by `reference(*node.args)` traced to ATen (`_template`)."""
    tensors = [a for a in node.args if isinstance(a, Node)]
    template = _template(reference, node.args, tensors, templates, provider=False)
    _replace(node, template.stamp(graph, node, tensors))


def _call_provider(graph: Graph, node: Node, impl: Any, templates: dict) -> None:
    """Make `node` call the provider's op `impl` (same signature as the IR op). An op that
    decomposes when traced under functionalization, as AOT autograd traces a model (a
    `torch.library.triton_op`: its kernel launch becomes Triton's kernel HOP), is spliced in as
    that trace, since fxsp runs after AOT autograd and Inductor would otherwise see only the
    opaque op; any other op (FlashInfer's) just becomes the node's target."""
    tensors = [a for a in node.args if isinstance(a, Node)]
    template = _template(impl, node.args, tensors, templates, provider=True)
    if template.opaque_call_of(impl):
        node.target = impl
    else:
        _replace(node, template.stamp(graph, node, tensors))


def _template(
    fn: Callable, args: tuple, tensors: list[Node], templates: dict, provider: bool
) -> _Template:
    """The template of `fn` on the same inputs' metadata and other arguments in `templates` (a
    dict kept for one graph), else a new trace that becomes that template."""
    key = _template_key(fn, args)
    template = templates.get(key) if key is not None else None
    if template is None:
        template = _Template(fn, args, tensors, provider)
        if key is not None:
            templates[key] = template
    return template


class _Template:
    """`fn` traced on fake inputs like the node's: a reference with Inductor's decompositions,
    a provider's op (`provider`) under functionalization and in the inputs' fake mode, as AOT
    autograd traces it (its body may make tensors, which must be fake on any device)."""

    def __init__(self, fn: Callable, args: tuple, tensors: list[Node], provider: bool) -> None:
        def call(*values: torch.Tensor) -> Any:
            it = iter(values)
            return fn(*[next(it) if isinstance(a, Node) else a for a in args])

        inputs = _fake_inputs(tensors)
        if provider:
            from torch._subclasses.functional_tensor import dispatch_functionalize

            with detect_fake_mode(inputs) or contextlib.nullcontext():
                self.graph = make_fx(dispatch_functionalize(call))(*inputs).graph
        else:
            from torch._inductor.decomposition import select_decomp_table  # heavy import

            self.graph = make_fx(call, decomposition_table=select_decomp_table())(*inputs).graph
        self.inputs = self.graph.find_nodes(op="placeholder")
        for inner in self.graph.nodes:
            assert inner.op in ("placeholder", "call_function", "output"), inner.format_node()
        # A node whose value has a storage of its own gets a fresh fake tensor like the
        # template's at each stamp; a view (of an input, say) has its value computed again.
        storages: set = set()
        # (node to copy, its name without a numeric suffix, whether its value owns storage).
        # The graph numbers the copies itself: asked for `mul_1`, torch 2.11 would try mul_1,
        # mul_2, ... up to the first free name, at every stamp.
        self.steps: list[tuple[Node, str, bool]] = []
        for inner in self.graph.nodes:
            val = inner.meta.get("val")
            storage = val.untyped_storage()._cdata if isinstance(val, FakeTensor) else None
            if inner.op == "call_function":
                self.steps.append(
                    (
                        inner,
                        re.sub(r"_\d+$", "", inner.name),
                        storage is not None
                        and storage not in storages
                        and val.storage_offset() == 0,
                    )
                )
            storages.add(storage)
        # A raw SymInt argument (none that make_fx writes) is copied by node_copy, which warns.
        self.plain = not any(
            has_raw_symbolic((inner.args, inner.kwargs)) for inner, _, _ in self.steps
        )

    def opaque_call_of(self, op: Any) -> bool:
        """Whether the trace is `op` called as it is (its items aside): nothing to splice."""
        calls = [
            n
            for n in self.graph.nodes
            if n.op == "call_function" and n.target is not operator.getitem
        ]
        return len(calls) == 1 and calls[0].target is op

    def stamp(self, graph: Graph, node: Node, tensors: list[Node]) -> Any:
        """Copy the template's nodes in before `node`, its inputs bound to `tensors`; returns
        what stands for the template's output (a node, or a tuple of them)."""
        env = dict(zip(self.inputs, tensors, strict=True))
        with graph.inserting_before(node):
            for inner, name, owns_storage in self.steps:
                if self.plain:
                    stamped = create_call(
                        graph,
                        inner.target,
                        map_arg(inner.args, env.__getitem__),
                        map_arg(inner.kwargs, env.__getitem__),
                        name,
                        inner.type,
                    )
                    stamped.meta.update(inner.meta)  # its own fresh dict (no Node.__setattr__)
                else:
                    stamped = graph.node_copy(inner, env.__getitem__)
                env[inner] = stamped
                # The copy keeps the traced meta (the rounding barriers Inductor's
                # emulate_precision_casts relies on), with a value of its own.
                if owns_storage:
                    stamped.meta["val"] = fresh_like(inner.meta["val"])
                elif "val" in inner.meta:
                    stamped.meta["val"] = fake_value(stamped.target, stamped.args, stamped.kwargs)
        return tree_map(
            lambda n: env[n] if isinstance(n, torch.fx.Node) else n,
            self.graph.output_node().args[0],
        )


def _template_key(reference: Callable, args: tuple) -> tuple | None:
    """What a trace of `reference(*args)` depends on; None when an argument has no such key."""
    described = []
    for a in args:
        if isinstance(a, Node):
            val = a.meta.get("val")
            if not isinstance(val, FakeTensor):
                return None
            described.append(val)
        else:
            described.append(a)
    return _key(reference, tuple(described))


def _fake_inputs(nodes: list[Node]) -> list[torch.Tensor]:
    """The nodes' fake values, in one fake mode (graphs traced by make_fx in real mode give each
    value its own: rebuild those in a fresh one)."""
    vals = [_val(n) for n in nodes]
    try:
        detect_fake_mode(vals)
        return vals
    except AssertionError:
        with FakeTensorMode(allow_non_fake_inputs=True):
            return [
                torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
                for v in vals
            ]


def _replace(node: Node, result: Any) -> None:
    """Point the users of `node` at `result` (a node, or a tuple for tuple-valued ops, whose
    getitem users take its items) and erase it."""
    items = list(node.users) if isinstance(result, (tuple, list)) else []
    for item in items:
        assert item.target is operator.getitem, f"{item.name} reads {node.name} whole"
        item.replace_all_uses_with(result[item.args[1]], propagate_meta=False)
    if not isinstance(result, (tuple, list)):
        node.replace_all_uses_with(result, propagate_meta=False)
    erase_unused([*items, node])
    assert node._erased, f"{node.name} is still read after lowering"


def _val(node: Any) -> torch.Tensor:
    val = tensor_of(node)
    if val is None:
        raise TypeError(f"lowering {node} needs its meta['val'] (a fake tensor)")
    return val
