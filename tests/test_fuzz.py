"""Differential fuzzing of TP graphs (fxsp/testing/fuzz.py), bounded for CI: random programs on
the fake process group against the in-process oracles, and fixed programs from the families the
fuzzer found against eager on gloo worlds and against a warm cache.

    python -m fxsp.testing.fuzz --examples 200      # the unbounded run, on demand
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from fxsp.testing.fuzz import Layer, Program, check, numerics, programs, warm_cache

# One program per family the fuzzer found (issue 24), each a regression test.
FAMILIES = {
    # symbolic rows, a -1 view before the residual add: a node used before its definition
    "view -1, symbolic rows": Program(
        layers=(Layer(between=("view_minus_one",)),), rows=13, symbolic=True
    ),
    # the residual returned from the graph: 1.5 times the all-reduce's bytes
    "residual returned": Program(layers=(Layer(reader="return"),), rows=12),
    # two layers, the second reading the first's residual, then returned
    "residual chain returned": Program(layers=(Layer(), Layer(reader="return")), rows=13),
    # a sum of two all-reduces before the add (parallel blocks, shared experts): folded
    "two all-reduces": Program(layers=(Layer(two_all_reduces=True),), rows=7, batched=True),
    # a value read in full by an op that mixes rows, bf16, HF's norm
    "rows summed": Program(layers=(Layer(reader="row_sum", hf_norm=True),), rows=9, bf16=True),
    # a dim marked dynamic whose example gives each rank one row: torch would specialise it
    # (ConstraintViolationError); the all-reduce stays, and says why
    "one row per rank, marked dynamic": Program(layers=(Layer(), Layer()), rows=2, symbolic=True),
    # all_reduce(a) + all_reduce(b) straight into a LayerNorm: folded before the add is raised
    # into the norm
    "two all-reduces into a LayerNorm": Program(
        layers=(Layer(residual=False, two_all_reduces=True, layer_norm=True),), rows=8
    ),
}


@pytest.mark.parametrize("fake_pg", [2, 3], indirect=True)
@settings(
    max_examples=12,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(program=programs())
def test_random_programs_keep_every_oracle(fake_pg, program):
    verdict = check(program, fake_pg)
    assert verdict.ok, f"{verdict.violations}\n{program}\n{program.source()}"


@pytest.mark.parametrize("fake_pg", [2, 3], indirect=True)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_keeps_every_oracle(fake_pg, family):
    program = FAMILIES[family]
    verdict = check(program, fake_pg)
    assert verdict.ok, f"{verdict.violations}\n{program.source()}"


@pytest.mark.parametrize(
    ("world", "family"), [(2, "view -1, symbolic rows"), (3, "residual chain returned")]
)
def test_families_equal_eager_on_gloo(world, family):
    assert numerics(FAMILIES[family], world) is None


def test_a_warm_cache_gives_the_cold_report():
    assert warm_cache(FAMILIES["two all-reduces"], 2) is None
