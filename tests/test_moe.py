"""MoE on real gloo worlds: a TP mixture-of-experts model (fxsp/testing/tp_moe.py) compiled with
fxsp equals eager on every rank, and SP rewrites exactly the all-reduce → norm sites it should.

Why SP is exact on MoE: every rank routes identically (a replicated router on identical rows),
so the MoE's all-reduce is a plain sum of per-rank partial outputs, as for a dense MLP. SP turns
all-reduce → norm into reduce-scatter → norm of this rank's rows → all-gather, and the router and
the experts read the all-gathered rows, the same on every rank. Nothing MoE-specific is matched.
An MoE output all-reduced as [T, H] rows and reshaped after is rewritten too: the reshape
keeps rows, so the shard passes through it (fxsp/sp/rowwise.py). The sum of the routed
and the shared expert's separate all-reduces is left alone, with the reason in the report's
near-misses.
"""

from __future__ import annotations

import torch

import fxsp
from fxsp.testing.tp_moe import MoESpec, TPMoE
from tests.worlds import run_world

BASE = MoESpec()
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 6e-2}


def expected_counts(spec: MoESpec) -> dict:
    """SP matches: which all-reduce feeds each norm, in order (per layer the input norm when there
    is attention, then the post norm; then the final norm)."""
    sources, last = [], "embedding"
    for _ in range(spec.layers):
        for block in ("attention", "moe") if spec.attention else ("moe",):
            sources.append(last)
            last = block
    sources.append(last)
    # A shared expert's all-reduce is folded into the routed experts' one (sp/fold.py), so every
    # MoE block is a site; a reshape after the all-reduce is crossed.
    middle = sum(s in ("attention", "moe") for s in sources[1:-1])
    # the embedding's all-reduce (also the residual) → first; the final norm's residual is dead
    counts = {"sp.first": 1, "sp.middle": middle, "sp.last": 1, "fold.pair": spec.layers}
    if not spec.shared_all_reduce:
        del counts["fold.pair"]
    return {name: n for name, n in counts.items() if n}


def compile_and_compare(rank: int, world: int, cases: list) -> list:
    """For each (spec, rows list, inner[, dynamic]): max |compiled - eager| per row count, and
    the SP rule counts of the graphs compiled for it (none when a dynamic graph is reused)."""
    out = []
    for spec, rows_list, inner, *dynamic in cases:
        torch._dynamo.reset()
        model = TPMoE(spec)
        backend = fxsp.backend(None, inner=inner)
        compiled = torch.compile(model, backend=backend)
        for rows in rows_list:
            inputs = model.example_input(rows)
            if dynamic and dynamic[0]:  # token dims symbolic: one graph for every row count
                for dim in range(inputs.dim()):
                    torch._dynamo.mark_dynamic(inputs, dim)
            seen = len(backend.reports)
            with torch.no_grad():
                reference, result = model(inputs), compiled(inputs)
            counts: dict = {}
            misses = []
            for report in backend.reports[seen:]:
                for name, n in report.counts.items():
                    if n and name.startswith(("sp.", "fold.")):
                        counts[name] = counts.get(name, 0) + n
                misses += [str(near) for name, near in report.misses.items() if name == "sp.last"]
            assert result.shape == reference.shape, (result.shape, reference.shape)
            error = (result.float() - reference.float()).abs().max().item()
            out.append((spec, rows, inner, error, counts, misses, len(backend.reports) > seen))
    return out


def check(results_by_rank: list) -> None:
    for rank, results in enumerate(results_by_rank):
        assert results and results[0][-1], "the first call must compile"
        for spec, rows, inner, error, counts, misses, compiled in results:
            where = f"rank {rank}, rows {rows}, inner {inner}, {spec}"
            assert error <= TOLERANCE[spec.dtype], f"max error {error} at {where}"
            if compiled:
                assert counts == expected_counts(spec), f"{counts} at {where}"
                if "sp.last" not in counts:  # the final norm left alone, and why
                    assert misses, f"no near-miss at {where}"


def test_moe_two_ranks_equals_eager():
    cases = [
        (BASE, [5, 16], "eager", True),  # symbolic rows: one graph, two row counts
        (
            BASE.with_(dispatch="dense", shared_expert=True, norm_topk_prob=False, batched=True),
            [6],
            "eager",
        ),
        # an all-reduce of rows reshaped after (rewritten), a shared expert reduced apart (folded
        # into the routed experts' all-reduce)
        (BASE.with_(batched=True, reduce_rows=True), [6], "eager"),
        (BASE.with_(attention=False, shared_expert=True, shared_all_reduce=True), [5], "eager"),
        (BASE.with_(attention=False, layers=1), [5], "inductor"),
    ]
    check(run_world(2, compile_and_compare, cases))


def test_moe_three_ranks_equals_eager():
    spec = BASE.with_(attention=False, layers=3, shared_expert=True)
    check(run_world(3, compile_and_compare, [(spec, [7], "eager")]))


def test_expected_counts():
    assert expected_counts(BASE) == {"sp.first": 1, "sp.middle": 3, "sp.last": 1}
    assert expected_counts(BASE.with_(attention=False, layers=3)) == {
        "sp.first": 1,
        "sp.middle": 2,
        "sp.last": 1,
    }
    assert expected_counts(BASE.with_(batched=True, reduce_rows=True)) == {
        "sp.first": 1,
        "sp.middle": 3,
        "sp.last": 1,
    }
    assert expected_counts(
        BASE.with_(attention=False, shared_expert=True, shared_all_reduce=True)
    ) == {"sp.first": 1, "sp.middle": 1, "sp.last": 1, "fold.pair": 2}


# --- vLLM's MoE SP case: the chunk after the norm folds into the shard --------------------------


def chunk_models_equal_eager(rank: int, world: int, cases: list) -> list:
    """vLLM's chunk models (tests/support.py) against eager, compiled with plain
    Inductor and with fxsp: (case, max error of each, chunk folds, all-gathers left)."""
    from tests.support import AllReduceRMSNormChunkModel

    out = []
    for dtype, seq_len, with_residual, spelling, dynamic in cases:
        torch.manual_seed(0)
        model = AllReduceRMSNormChunkModel(dtype, spelling, with_residual)
        x = torch.randn(seq_len, 32, generator=torch.Generator().manual_seed(rank)).to(dtype)
        residual = torch.randn(seq_len, 32, generator=torch.Generator().manual_seed(99)).to(dtype)
        errors = {}
        for name, backend in (("plain", "inductor"), ("fxsp", fxsp.backend(None, min_tokens=0))):
            torch._dynamo.reset()
            for arg in (x, residual) if dynamic else ():
                torch._dynamo.mark_dynamic(arg, 0)
            with torch.no_grad():
                want, got = (
                    model(x, residual),
                    torch.compile(model, backend=backend, fullgraph=True)(x, residual),
                )
            pairs = zip(got, want, strict=True) if with_residual else [(got, want)]
            errors[name] = max((g.float() - w.float()).abs().max().item() for g, w in pairs)
        folds = sum(
            n for r in backend.reports for name, n in r.counts.items() if name.startswith("chunk.")
        )
        gathers = sum(r.after.count("all_gather_into_tensor.default(") for r in backend.reports)
        out.append((dtype, seq_len, with_residual, spelling, dynamic, errors, folds, gathers))
    return out


def test_moe_chunk_folds_into_the_shard_and_equals_eager(tmp_path):
    """Replicated inputs (the residual) are the same on every rank, as in a TP model; each
    rank's x differs (it is all-reduced)."""
    f16, bf16 = torch.float16, torch.bfloat16
    cases_by_world = {  # (dtype, rows, with_residual, spelling, symbolic rows); 2 cores: few
        2: [
            (f16, 15, False, "vllm", False),
            (bf16, 16, True, "torch", False),
            (f16, 15, True, "torch", False),
            (bf16, 15, True, "vllm", True),
        ],
        3: [(bf16, 16, True, "vllm", False), (f16, 16, False, "torch", False)],
    }
    for world, cases in cases_by_world.items():
        # A cache per world: plain Inductor's cache key does not know the world size.
        by_rank = run_world(
            world, chunk_models_equal_eager, cases, cache_dir=str(tmp_path / str(world))
        )
        results = [r for rank_results in by_rank for r in rank_results]
        for dtype in (torch.float16, torch.bfloat16):
            mine = [r for r in results if r[0] == dtype]
            bar = max(r[5]["plain"] for r in mine)  # what plain Inductor meets on these cases
            assert all(r[5]["fxsp"] <= bar for r in mine), (world, [r[:6] for r in mine])
        for *case, errors, folds, gathers in results:
            assert folds == 1, (world, case)
            assert gathers == int(case[2]), (world, case)  # only the residual leaves whole
