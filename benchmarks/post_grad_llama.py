"""Raw post-grad graphs of a TP Llama: what Inductor hands its post-grad passes, fxsp's input.

    gm = post_grad_graph(layers=80, norm="hf")      # or norm="torch" (F.rms_norm)

The model is fxsp.testing.tp_llama.TPLlama (functional all-reduce, bf16, [T, H] activations)
compiled on the current process group (a fake one in the benchmarks). The graph is taken where
fxsp's backend runs, as Inductor's post-grad *pre* pass, and the compile stops right there: no
codegen. Every value's `meta["val"]` is the fake tensor Inductor gave it. Sizes are small, since
the graph is measured, not the math; the node count does not depend on them.
"""

from __future__ import annotations

import copy

import torch
from torch.fx import GraphModule

from fxsp.testing.tp_llama import Spec, TPLlama

HIDDEN, HEADS, INTER, VOCAB, ROWS = 64, 4, 128, 64, 32
DTYPE = torch.bfloat16


def llama_spec(layers: int, norm: str = "hf") -> Spec:
    return Spec(
        layers=layers, hidden=HIDDEN, heads=HEADS, inter=INTER, vocab=VOCAB, norm=norm, dtype=DTYPE
    )


class _Captured(Exception):
    """Stops the compile once the graph is taken."""


def post_grad_graph(layers: int, norm: str = "hf", rows: int = ROWS) -> GraphModule:
    """The forward post-grad graph of a `layers`-layer TPLlama with `norm` ("hf" or "torch")."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import CustomGraphPass

    taken: list[GraphModule] = []

    class Capture(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            taken.append(GraphModule(torch.nn.Module(), copy.deepcopy(graph)))
            raise _Captured

        def uuid(self) -> None:
            return None  # no cache: the pass must run

    def backend(gm: GraphModule, example_inputs: list):
        return compile_fx(
            gm, example_inputs, config_patches={"post_grad_custom_pre_pass": Capture()}
        )

    torch._dynamo.reset()
    model = TPLlama(llama_spec(layers, norm))
    tokens = model.example_input(rows)
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend)(tokens)
    except Exception as error:  # Dynamo wraps what the backend raised
        if not taken:
            raise
        del error
    torch._dynamo.reset()
    return taken[0]
