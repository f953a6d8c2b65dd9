"""Sequence parallelism for training (issue 22, docs/training.md): HF models parallelised with
their TP plan through DTensor, one training step compiled with fxsp against the same step in
eager TP on gloo worlds of 2 and 3 ranks: the loss and every parameter's gradient on every rank
(norm weights and biases included), the sites rewritten, and the bytes sent per rank against
plain TP compiled the same way.

Rows [2, 7]: the sequence dim (7) is sharded, unevenly at TP 2 and 3.
"""

from __future__ import annotations

import pytest
import torch

from fxsp.training import dtensor
from tests.worlds import run_world

pytestmark = pytest.mark.skipif(
    dtensor.from_local is None,
    reason="torch before 2.13 records DTensor calls as closures: SP for training needs 2.13",
)

# Case -> ((model_type, config overrides), fxsp options, dtype), (SP sites rewritten on Dynamo's
# graph, sums of all-reduces folded). Llama keeps a replicated embedding (its plan has none);
# Cohere's plan makes it vocab-parallel (one more site) and ties it to the head; Cohere and
# GPT-NeoX's parallel blocks all-reduce attention and MLP apart, folded into one site per layer.
CASES = {
    "llama": ((("llama", {}), {}, torch.float32), (4, 0)),
    "llama, gathers again": ((("llama", {}), {"recompute_gathers": True}, torch.float32), (4, 0)),
    "llama, async TP": ((("llama", {}), {"async_tp": True}, torch.float32), (4, 0)),
    "llama bf16": ((("llama", {}), {}, torch.bfloat16), (4, 0)),
    "cohere": ((("cohere", {}), {}, torch.float32), (3, 2)),
    "gpt_neox_parallel": (
        (("gpt_neox", {"use_parallel_residual": True}), {}, torch.float32),
        (2, 2),
    ),
}
# Worst relative error allowed in the loss and each gradient: fp32 as the issue asks; bf16 sums
# in another order (reduce-scatter then all-gather against all-reduce) and rounds once per op.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def train_step(rank: int, world: int, names: list[str], inner: str, rows: tuple) -> dict:
    """Per case, one step on token ids of shape `rows`: (relative |loss - eager|, worst relative
    gradient error and its parameter, SP sites, bytes sent per rank with fxsp's SP and with
    plain TP, forward and backward, the bytes of the replicated vectors: norm weights and
    biases, and per graph the async TP coverage (fusable, fused, why not) where it ran). With
    async_tp, symmetric memory is mocked (fxsp.testing.async_tp): the fused ops run torch's
    reference implementations over gloo."""
    import contextlib

    from torch.distributed.device_mesh import init_device_mesh

    import fxsp
    from fxsp.testing.async_tp import mocked_symmetric_memory
    from fxsp.testing.hf import parallelize, tiny_model

    mesh = init_device_mesh("cpu", (world,))
    ids = torch.randint(3, 128, rows, generator=torch.Generator().manual_seed(7))
    results = {}
    for name in names:
        ((model_type, config), options, dtype), _ = CASES[name]

        def model_of():
            model = tiny_model(model_type, **config).to(dtype).train()
            return parallelize(model, mesh)

        eager = model_of()
        want = eager(ids, labels=ids).loss
        want.backward()
        sent = {}
        for variant, variant_options in (("sp", options), ("tp", {"min_tokens": 10**9})):
            torch._dynamo.reset()
            model = model_of()
            backend = fxsp.backend(mesh, inner=inner, **variant_options)
            fusing = variant_options.get("async_tp")
            with mocked_symmetric_memory() if fusing else contextlib.nullcontext():
                loss = torch.compile(model, backend=backend)(ids, labels=ids).loss
                loss.backward()
            sent[variant] = sum(r.traffic_after.sent_per_rank(world) for r in backend.reports)
            if variant == "sp":
                got = loss
                coverage = [
                    (r.async_tp.fusable, r.async_tp.fused, r.async_tp.blocked)
                    for r in backend.reports
                    if r.async_tp is not None
                ]
                sites = tuple(
                    sum(getattr(t, k) for t in backend.training_reports)
                    for k in ("sites", "folded")
                )
                worst = (0.0, None)
                for (param, a), (_, b) in zip(
                    eager.named_parameters(), model.named_parameters(), strict=True
                ):
                    expected, actual = _local(a.grad), _local(b.grad)
                    error = ((actual - expected).abs().max() / expected.abs().max()).item()
                    worst = max(worst, (error, param), key=lambda e: e[0])
        replicated = sum(
            p.numel() * p.element_size()
            for p in eager.parameters()
            if p.dim() == 1 and not hasattr(p, "to_local")
        )
        results[name] = (
            ((got - want).abs() / want.abs()).item(),
            worst,
            sites,
            sent["sp"],
            sent["tp"],
            replicated,
            coverage,
        )
    return results


# Inductor compiles Llama's forward and backward at TP 2 on [2, 7] (7 tokens a sequence: uneven
# shards), and with async TP at TP 3 on [1, 13] (13 tokens: uneven, and rank 2's shard shorter
# than the others'); every other case's graphs run as fxsp leaves them at TP 3, on [1, 13]
# (within CI's time). Async TP needs Inductor (micro-pipeline TP is its pass); its graphs at TP 2
# are checked on the fake process group (test_async_tp_reports_both_graphs_...).
ASYNC_TP = ["llama, async TP"]


@pytest.mark.parametrize(
    ("world", "inner", "names", "rows"),
    [
        (2, "inductor", ["llama"], (2, 7)),
        (3, "inductor", ASYNC_TP, (1, 13)),
        (3, "eager", [name for name in CASES if name not in ASYNC_TP], (1, 13)),
    ],
)
def test_training_step_equals_eager_tp(world, inner, names, rows):
    for rank, results in enumerate(run_world(world, train_step, names, inner, rows, timeout=1500)):
        for name in names:
            loss_error, (grad_error, param), sites, sent_sp, sent_tp, replicated_grads, coverage = (
                results[name]
            )
            (_, options, dtype), want_sites = CASES[name]
            assert loss_error <= TOLERANCE[dtype], (name, rank, loss_error)
            assert grad_error <= TOLERANCE[dtype], (name, rank, param, grad_error)
            assert sites == want_sites, (name, sites)
            # Plain TP's bytes, up to the pad rows (8 or 9 sent for 7) and the all-reduce of the
            # norm weights' gradients, which SP adds (each rank's rows give a partial sum).
            # Gathering again in backward sends one more all-gather a column-parallel input.
            tokens = rows[-1]
            padded = -(-tokens // world) * world
            bound = sent_tp * padded / tokens + replicated_grads
            if options.get("recompute_gathers"):
                assert bound < sent_sp < 1.5 * bound, (name, sent_sp, sent_tp)
            else:
                assert sent_sp <= bound, (name, sent_sp, sent_tp)
            if options.get("async_tp"):
                # Each site's reduce-scatter and each all-gather before a matmul (4 layer
                # sites, 4 norms read by column-parallel modules, the head among them), and
                # their conjugates in backward, where the q/k/v and gate/up input gradients
                # are summed by one matmul.
                (fw_fusable, fw_fused, _), (bw_fusable, bw_fused, _) = coverage
                assert (fw_fusable, fw_fused, bw_fusable, bw_fused) == (8, 8, 8, 8), coverage


def test_dropout_in_the_region_is_left_alone(fake_pg):
    """Residual dropout drawn on this rank's rows would differ from TP's masks: the site keeps
    its all-reduce and the report says why."""
    from torch.distributed.device_mesh import init_device_mesh

    import fxsp
    from fxsp.testing.hf import parallelize, tiny_model

    mesh = init_device_mesh("cpu", (fake_pg,))
    model = parallelize(tiny_model("gpt_neox", hidden_dropout=0.1).train(), mesh)
    backend = fxsp.backend(mesh, inner="eager")
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    torch.compile(model, backend=backend)(ids, labels=ids).loss.backward()
    (report,) = backend.training_reports
    assert report.sites == 0
    assert report.misses and all("dropout (p=0.1) reads it" in m for m in report.misses), (
        report.misses
    )


def test_dropout_joins_the_region_when_asked(fake_pg):
    """`sharded_dropout=True`: the same model's sites are rewritten, dropout drawn on each
    rank's rows."""
    from torch.distributed.device_mesh import init_device_mesh

    import fxsp
    from fxsp.testing.hf import parallelize, tiny_model

    mesh = init_device_mesh("cpu", (fake_pg,))
    config = {"hidden_dropout": 0.1, "use_parallel_residual": False}
    model = parallelize(tiny_model("gpt_neox", **config).train(), mesh)
    backend = fxsp.backend(mesh, inner="eager", sharded_dropout=True)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    torch.compile(model, backend=backend)(ids, labels=ids).loss.backward()
    (report,) = backend.training_reports
    assert report.sites == 4 and not any("dropout" in m for m in report.misses), report


@pytest.mark.parametrize("fake_pg", [2, 3], indirect=True)
def test_activations_kept_are_no_more_than_the_hand_written_plan(fake_pg):
    """Per rank, the bytes autograd keeps for backward: fxsp's SP on the plain TP plan keeps no
    more than torchtitan's hand-written SP plan on the same model, and all-gathering again in
    backward keeps less (benchmarks/training_memory.py prints the table)."""
    from torch.distributed.device_mesh import init_device_mesh

    import fxsp
    from fxsp.testing.hf import parallelize, parallelize_sp_by_hand, plan_of, tiny_model
    from fxsp.testing.memory import kept_for_backward

    mesh = init_device_mesh("cpu", (fake_pg,))
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(7))

    def kept(options: dict | None) -> int:
        torch._dynamo.reset()
        model = tiny_model("llama").train()
        if options is None:
            model = parallelize_sp_by_hand(model, mesh)
            options = {"min_tokens": 10**9}  # nothing left for fxsp: the same partitioner
        else:
            model = parallelize(
                model, mesh, {**plan_of(model), "embed_tokens": "embedding_rowwise"}
            )
        compiled = torch.compile(model, backend=fxsp.backend(mesh, inner="eager", **options))
        return kept_for_backward(model, lambda: compiled(ids, labels=ids).loss)

    tp, hand, sp, again = (
        kept({"min_tokens": 10**9}),
        kept(None),
        kept({}),
        kept({"recompute_gathers": True}),
    )
    assert sp <= hand < tp, (sp, hand, tp)
    assert again < sp, (again, sp)


class HandWritten(torch.nn.Module):
    """fxsp.testing.tp_llama's model with Megatron's autograd collectives ("f" before each
    column-parallel matmul, "g" after each row-parallel one) and a column-parallel head; the
    loss: the mean square of this rank's logits."""

    def __init__(self, rank: int, world: int, batched: bool = True) -> None:
        from fxsp.testing.tp_llama import Spec, TPLlama

        super().__init__()
        self.model = TPLlama(Spec(collective="autograd", batched=batched))
        self.head = torch.nn.Parameter(torch.randn(30, 48).chunk(world)[rank].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        logits = F.linear(self.model.column_parallel_input(self.model(x)), self.head)
        return (logits.float() ** 2).mean()


def hand_written_step(rank: int, world: int, inner: str, rows: int) -> tuple:
    """`HandWritten` on [B, S, H]: (relative loss error, worst relative gradient error and its
    parameter, the report)."""
    import fxsp

    eager, model = HandWritten(rank, world), HandWritten(rank, world)
    x = eager.model.example_input(rows)
    want = eager(x)
    want.backward()
    backend = fxsp.backend(None, inner=inner)
    got = torch.compile(model, backend=backend)(x)
    got.backward()
    worst = max(
        (((b.grad - a.grad).abs().max() / a.grad.abs().max()).item(), name)
        for (name, a), (_, b) in zip(eager.named_parameters(), model.named_parameters())
    )
    return ((got - want).abs() / want.abs()).item(), worst, backend.training_reports


# Without codegen (CI's time): Inductor compiles what the lifting leaves as it compiles DTensor
# models' graphs (test_training_step_equals_eager_tp).
@pytest.mark.parametrize(("world", "inner", "rows"), [(2, "eager", 14), (3, "eager", 13)])
def test_hand_written_autograd_collectives_equal_eager_tp(world, inner, rows):
    """Megatron-style models: their autograd functions are lifted to DTensor and rewritten; the
    loss and every gradient equal eager TP's on every rank (13 rows at TP 3: uneven shards)."""
    for rank, (loss_error, (grad_error, param), reports) in enumerate(
        run_world(world, hand_written_step, inner, rows, timeout=900)
    ):
        assert loss_error <= 1e-5, (rank, loss_error)
        assert grad_error <= 1e-5, (rank, param, grad_error)
        (report,) = reports
        # 2 layers: the embedding's all-reduce and 4 in the layers; 5 "g" and 5 "f" lifted.
        assert (report.sites, report.lifted) == (5, 10), report


def test_async_tp_reports_both_graphs_on_a_cold_and_a_warm_cache(fake_pg):
    """async_tp=True on a training graph: micro-pipeline TP fuses the forward's and the
    backward's collectives (fxsp.training.fusable_layout lays DTensor's out for it, uneven shards
    included), and each graph's report says what fused and why the rest did not, from the cache
    too. One layer: 2 sites, the post-attention norm and the final norm gathered before matmuls."""
    from torch.distributed.device_mesh import init_device_mesh

    import fxsp
    from fxsp.testing.async_tp import mocked_symmetric_memory
    from fxsp.testing.hf import parallelize, tiny_model

    mesh = init_device_mesh("cpu", (fake_pg,))
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(7))

    def run() -> list:
        torch._dynamo.reset()
        model = parallelize(tiny_model("llama", num_hidden_layers=1).train(), mesh)
        backend = fxsp.backend(mesh, async_tp=True)
        with mocked_symmetric_memory():
            torch.compile(model, backend=backend)(ids, labels=ids).loss.backward()
        assert [r.sites for r in backend.training_reports] == [2]
        return [(r.cached, str(r.async_tp), r.async_tp.blocked) for r in backend.reports]

    cold, warm = run(), run()
    assert [c for c, *_ in cold] == [False, False] and [c for c, *_ in warm] == [True, True]
    assert [rest for _, *rest in warm] == [rest for _, *rest in cold]
    (_, forward, _), (_, backward, why) = cold
    assert forward == "async TP: 4 of 4 fusable sites fused", forward
    # Backward: the two sites' all-gathers, the head's input-gradient reduce-scatter, and that
    # of the gate and up projections' input gradients, summed by one matmul.
    assert backward == "async TP: 4 of 4 fusable sites fused", (backward, why)


def test_async_tp_names_a_parallel_block_sum_in_the_forward(fake_pg):
    """Cohere's parallel blocks: the attention and MLP outputs of a layer are summed before one
    reduce-scatter (folded). In the forward that sum stays two matmuls (inference runs the same
    graph; the weight copy that would make it one waits for GPU figures), and the report names
    it; the backward's sums of input gradients are made one matmul and fuse."""
    from torch.distributed.device_mesh import init_device_mesh

    import fxsp
    from fxsp.testing.async_tp import mocked_symmetric_memory
    from fxsp.testing.hf import parallelize, tiny_model

    mesh = init_device_mesh("cpu", (fake_pg,))
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(7))
    model = parallelize(tiny_model("cohere").train(), mesh)
    backend = fxsp.backend(mesh, async_tp=True)
    with mocked_symmetric_memory():
        torch.compile(model, backend=backend)(ids, labels=ids).loss.backward()
    assert [(r.sites, r.folded) for r in backend.training_reports] == [(3, 2)]
    forward, backward = (r.async_tp for r in backend.reports)
    assert (forward.fusable, forward.fused) == (5, 3), forward.blocked
    assert len(forward.blocked) == 2, forward.blocked
    assert all("sums 2 matmuls" in why for why in forward.blocked), forward.blocked
    assert (backward.fusable, backward.fused) == (5, 5), backward.blocked


@pytest.mark.parametrize("fake_pg", [3], indirect=True)
def test_async_tp_fuses_a_hand_written_model_on_token_rows(fake_pg):
    """[T, H] activations, 13 rows at TP 3 (uneven), Megatron-style autograd collectives: the
    forward's 5 reduce-scatters and 4 all-gathers fuse, and their conjugates in the backward,
    where Inductor spells a sum of two 2-D matmuls `addmm`."""
    import fxsp
    from fxsp.testing.async_tp import mocked_symmetric_memory

    model = HandWritten(0, fake_pg, batched=False)
    backend = fxsp.backend(None, async_tp=True)
    with mocked_symmetric_memory():
        torch.compile(model, backend=backend)(model.model.example_input(13)).backward()
    assert [r.sites for r in backend.training_reports] == [5]
    forward, backward = (r.async_tp for r in backend.reports)
    assert (forward.fusable, forward.fused) == (9, 9), forward.blocked
    assert (backward.fusable, backward.fused) == (9, 9), backward.blocked


class ScaledReduce(torch.autograd.Function):
    """Not TP's "g": the forward all-reduces, then scales."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


def test_other_autograd_functions_are_left_alone(fake_pg):
    """Only a body that is one sum all-reduce of its input, or the identity, is lifted: a
    function that also computes is left as it is (no site, nothing lifted)."""
    import fxsp

    norm, weight = torch.nn.RMSNorm(8), torch.nn.Parameter(torch.randn(8, 8))

    def block(x: torch.Tensor) -> torch.Tensor:
        return norm(x + ScaledReduce.apply(x @ weight)) @ weight

    backend = fxsp.backend(None, inner="eager")
    torch.compile(block, backend=backend)(torch.randn(2, 6, 8)).sum().backward()
    (report,) = backend.training_reports
    assert (report.lifted, report.sites) == (0, 0), report


def test_a_warm_cache_keeps_the_training_rewrite_and_its_options(fake_pg):
    """Over one Inductor cache dir: the forward and backward come back from the cache with
    their reports, the rewrite of Dynamo's graph runs each time, and `recompute_gathers` is part
    of the cache key (a hit never hands one option's partition to the other)."""
    from torch.distributed.device_mesh import init_device_mesh

    import fxsp
    from fxsp.testing.hf import parallelize, tiny_model
    from fxsp.testing.memory import kept_for_backward

    mesh = init_device_mesh("cpu", (fake_pg,))
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(7))

    def run(**options) -> tuple:
        torch._dynamo.reset()
        model = parallelize(tiny_model("llama", num_hidden_layers=1).train(), mesh)
        backend = fxsp.backend(mesh, **options)
        compiled = torch.compile(model, backend=backend)
        kept = kept_for_backward(model, lambda: compiled(ids, labels=ids).loss)
        sites = [r.sites for r in backend.training_reports]
        return (
            kept,
            sites,
            [(r.cached, r.traffic_after.sent_per_rank(fake_pg)) for r in backend.reports],
        )

    cold, warm = run(), run()
    again_cold, again_warm = run(recompute_gathers=True), run(recompute_gathers=True)
    assert cold[1] == warm[1] == again_cold[1] == again_warm[1] == [2]
    assert [c for c, _ in cold[2]] == [False, False] and [c for c, _ in warm[2]] == [True, True]
    assert [b for _, b in warm[2]] == [b for _, b in cold[2]] and warm[0] == cold[0]
    assert [c for c, _ in again_cold[2]] == [False, False], "a hit across options"
    assert again_warm[0] == again_cold[0] < cold[0]
    assert sum(b for _, b in again_cold[2]) > sum(b for _, b in cold[2])
