"""How fast the fxsp DSL builds rules and applies a rule set.

    .venv/bin/python benchmarks/dsl_speed.py

(a) Building a rule set of 40 RMSNorm-like rules (eps ranges, cast and rsqrt variants): pure
    data, nothing traced; goal under 5 ms.
(b) Applying an RMSNorm-raising rule and a residual-add rule to Llama-style stacks of 16, 32,
    80 and 128 layers traced with make_fx (small sizes: the graph, not the math, is measured).
    Median of 5 runs, each on a fresh copy. Time should grow linearly: t(128)/t(16) ideally 8.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch
from torch.fx import GraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from fxsp import ADD, CAST, MUL, Rule, RuleSet, alt, dims, op, scalar, tensor, through

aten = torch.ops.aten

LAYER_COUNTS = (16, 32, 80, 128)
RUNS = 5
TOKENS, HIDDEN, INTERMEDIATE = 4, 16, 32


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


def rms_norm_pattern(eps_lo: float, eps_hi: float, casts: bool, reciprocal_sqrt: bool):
    """w * (x * rsqrt(mean(x², -1) + eps)), optionally with a cast before the weight and with
    1/sqrt for rsqrt."""
    x = tensor("x")
    variance = op(aten.mean.dim, op(aten.pow.Tensor_Scalar, x, 2), dims([-1]), True)
    shifted = op(ADD, variance, scalar("eps", eps_lo, eps_hi))
    inverse = (
        op(aten.reciprocal.default, op(aten.sqrt.default, shifted))
        if reciprocal_sqrt
        else op(aten.rsqrt.default, shifted)
    )
    normed = op(MUL, x, inverse)
    return op(MUL, tensor("w"), through(normed, CAST) if casts else normed)


def to_rms_norm(b, m):
    return b.call(aten.rms_norm.default, m["x"], [m["x"].meta["val"].shape[-1]], m["w"], m["eps"])


def residual_matmul_pattern():
    """residual + a @ w, the residual on either side."""
    return op(aten.add.Tensor, tensor("residual"), op(aten.mm.default, tensor("a"), tensor("w")))


def to_addmm(b, m):
    return b.call(aten.addmm.default, m["residual"], m["a"], m["w"])


def many_norm_rules() -> RuleSet:
    """40 RMSNorm-like rules: 10 eps ranges × with/without casts × rsqrt or 1/sqrt."""
    rules = []
    for i in range(10):
        for casts in (False, True):
            for reciprocal_sqrt in (False, True):
                name = f"rms_norm[{i}]" + "+casts" * casts + "+1/sqrt" * reciprocal_sqrt
                pattern = rms_norm_pattern(10.0 ** -(i + 1), 10.0**-i, casts, reciprocal_sqrt)
                rules.append(Rule(name, pattern, to_rms_norm))
    return RuleSet("norms", rules)


def llama_rules(rewrite: bool = True) -> RuleSet:
    """RMSNorm raising and residual addmm; `rewrite=False` keeps the matching and drops the
    rewrites (whose cost is mostly computing fake tensors for the new nodes)."""
    either_norm = alt(
        rms_norm_pattern(0.0, 1e-2, casts=True, reciprocal_sqrt=False),
        rms_norm_pattern(0.0, 1e-2, casts=True, reciprocal_sqrt=True),
    )

    def keep(b, m):
        return None

    return RuleSet(
        "llama",
        [
            Rule("rms_norm", either_norm, to_rms_norm if rewrite else keep),
            Rule("residual_addmm", residual_matmul_pattern(), to_addmm if rewrite else keep),
        ],
    )


# ---------------------------------------------------------------------------------------------
# Synthetic Llama-style graphs
# ---------------------------------------------------------------------------------------------


def hf_rms_norm(x, w):
    variance = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(variance + 1e-6))


def llama_stack(h, weights):
    """Per layer: norm, q/k/v/o matmuls and a softmax, residual add, norm, silu MLP, residual
    add."""
    for attn_norm, wq, wk, wv, wo, mlp_norm, gate, up, down in weights:
        x = hf_rms_norm(h, attn_norm)
        scores = torch.softmax((x @ wq) @ (x @ wk).t(), dim=-1)
        h = h + (scores @ (x @ wv)) @ wo
        x = hf_rms_norm(h, mlp_norm)
        h = h + (torch.nn.functional.silu(x @ gate) * (x @ up)) @ down
    return h


def layer_weights(layers: int) -> list:
    def w(*shape):
        return torch.randn(shape) * 0.1

    square = (HIDDEN, HIDDEN)
    return [
        (
            torch.ones(HIDDEN),
            w(*square),
            w(*square),
            w(*square),
            w(*square),
            torch.ones(HIDDEN),
            w(HIDDEN, INTERMEDIATE),
            w(HIDDEN, INTERMEDIATE),
            w(INTERMEDIATE, HIDDEN),
        )
        for _ in range(layers)
    ]


def trace_stack(layers: int) -> GraphModule:
    # Fake tracing gives every meta["val"] one shared fake mode, as in the post-grad graphs
    # torch.compile hands to fxsp (real-mode make_fx gives each value a mode of its own).
    trace = make_fx(llama_stack, tracing_mode="fake")
    return trace(torch.randn(TOKENS, HIDDEN), layer_weights(layers))


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def time_build(repeats: int = 20) -> float:
    """Median seconds to build the 40-rule set."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        many_norm_rules()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_apply(original: GraphModule, rules: RuleSet) -> tuple[dict, float]:
    """(matches per rule, median seconds) of applying `rules` to copies of `original`.

    Each run rewrites a fresh deep copy; the copy is not timed. `apply` is given the graph, so
    the time is the pass alone, not the GraphModule's Python code generation."""
    times, counts = [], {}
    for _ in range(RUNS):
        gm = copy.deepcopy(original)
        start = time.perf_counter()
        counts = rules.apply(gm.graph).counts
        times.append(time.perf_counter() - start)
    return counts, statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    # deepcopy of a GraphModule warns about a pytree deprecation inside torch: noise here.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    build = time_build()
    print(f"build 40 rules: {build * 1e3:.2f} ms (goal < 5 ms)\n")

    header = ("layers", "nodes", "rms_norm", "addmm", "match ms", "apply ms", "ms/layer")
    print("{:>6} {:>7} {:>8} {:>6} {:>9} {:>9} {:>9}".format(*header))
    results = {}
    for layers in LAYER_COUNTS:
        graph = trace_stack(layers)
        _, match_only = time_apply(graph, llama_rules(rewrite=False))
        counts, seconds = time_apply(graph, llama_rules())
        assert counts == {"rms_norm": 2 * layers, "residual_addmm": 2 * layers}, counts
        results[layers] = seconds
        print(
            f"{layers:>6} {len(graph.graph.nodes):>7} {counts['rms_norm']:>8} "
            f"{counts['residual_addmm']:>6} {match_only * 1e3:>9.2f} {seconds * 1e3:>9.2f} "
            f"{seconds / layers * 1e3:>9.2f}"
        )

    ratio = results[128] / results[16]
    print(
        f"\nsummary: build 40 rules {build * 1e3:.2f} ms; apply 16 layers "
        f"{results[16] * 1e3:.1f} ms, 128 layers {results[128] * 1e3:.1f} ms; "
        f"t(128)/t(16) = {ratio:.2f} (ideal 8)"
    )


if __name__ == "__main__":
    main()
