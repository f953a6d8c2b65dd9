"""Options, and what the rule sets take from them: `SPConfig` and `AllReduceNormConfig`.

    configs = Configs(Options(min_tokens=0))
    configs.sp(TPGroup.of(process_group))
    # -> SPConfig(group="0", world=2, rank=1, min_tokens=0, ...)

`Options` is defined once: the torch.compile backend (`fxsp.backend`) takes all of them, the
vLLM adapter (`FxspVllmPass`) the ones that apply inside vLLM (`VLLM_OPTIONS`) with the fused
all-reduce off (vLLM runs its own). Both build their configs here, so an option means the same in
both, and both say here, once, why a feature is off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from typing import Any

import torch.distributed as dist

from ..policy.fusion import FusionGate, allreduce_rms_fusion_gate
from ..policy.thresholds import DeviceLike, device_info
from ..sp.allreduce_norm import AllReduceNormConfig
from ..sp.rules import SPConfig

log = logging.getLogger("fxsp")


@dataclass(frozen=True)
class Options:
    """fxsp's options; every one is part of the compiled graph's cache key."""

    min_tokens: int | str = "auto"  # SP only for rows >= min_tokens; "auto": see policy.thresholds
    fp8: bool = True  # the FP8 SP rules (all-gather FP8 bytes)
    inner: str = "inductor"  # "inductor", or "eager": run the rewritten ATen graph without codegen
    explain: bool = False  # log every rule's best near-miss at INFO
    check_ranks: bool = True  # compare rewrite fingerprints across ranks before a graph's first run
    batch_invariant: bool = False  # results independent of batch size: no SP (see Configs.sp)
    shard_outputs: bool = False  # outputs fxsp gathered stay sharded: see runtime.gather_rows
    inductor_reuse_patch: bool = True  # torch 2.11 only: patches.inductor_reuse's cost model
    allreduce_fusion: bool = (
        True  # fused all-reduce + RMSNorm below the SP threshold, where allowed
    )
    pipeline_size: int = 1  # pipeline stages; the fused all-reduce is off above 1 (it deadlocks)
    # Inductor's micro-pipeline TP for fxsp's compiles, symmetric memory on the TP group: see
    # compile.async_tp. Without NCCL or symmetric memory it says so once and compiles without.
    async_tp: bool = False
    # Training: all-gather a column-parallel input again in backward instead of keeping it
    # (Megatron's way): 1/tp of those activations kept, one more all-gather each in backward,
    # so more bytes than plain TP sends; off by default (docs/training.md has the figures).
    recompute_gathers: bool = False
    # Training: residual dropout inside the SP region draws its masks on each rank's rows, so
    # they differ from the masks TP draws (same probability, other tokens dropped). Off by
    # default: such a site keeps TP and the report says why.
    sharded_dropout: bool = False

    def __post_init__(self) -> None:
        check_options(self)


# The options that apply inside vLLM (adapters/vllm.py); the others keep their defaults there.
VLLM_OPTIONS = ("min_tokens", "fp8", "explain", "async_tp")


def check_options(options: Options) -> None:
    """Raise a TypeError or ValueError saying what is allowed for the first bad value: bool
    fields take True or False, `min_tokens` "auto" or an int >= 0, `inner` "inductor" or "eager",
    `pipeline_size` an int >= 1."""
    for f in fields(options):
        value = getattr(options, f.name)
        if f.type in ("bool", bool) and not isinstance(value, bool):
            raise TypeError(f"fxsp option {f.name} must be True or False, not {value!r}")
    min_tokens = options.min_tokens
    if not (
        min_tokens == "auto" if isinstance(min_tokens, str) else _is_int(min_tokens, at_least=0)
    ):
        error = (
            ValueError
            if isinstance(min_tokens, (int, str)) and not isinstance(min_tokens, bool)
            else TypeError
        )
        raise error(f"fxsp option min_tokens must be 'auto' or an int >= 0, not {min_tokens!r}")
    if options.inner not in ("inductor", "eager"):
        raise ValueError(f"fxsp option inner must be 'inductor' or 'eager', not {options.inner!r}")
    pipeline_size = options.pipeline_size
    if not _is_int(pipeline_size, at_least=1):
        error = ValueError if _is_int(pipeline_size, at_least=-(2**63)) else TypeError
        raise error(f"fxsp option pipeline_size must be an int >= 1, not {pipeline_size!r}")


def _is_int(value: Any, at_least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= at_least


@dataclass(frozen=True)
class TPGroup:
    """A tensor-parallel group as the rewrite sees it."""

    name: str  # what the graph's all-reduces call the group (vLLM's: its unique_name, "tp:0")
    # The c10d name of the same ranks' device group where the graph's collectives are not c10d's
    # (vLLM's): async TP enables symmetric memory on it and SP emits c10d collectives over it.
    c10d_name: str | None
    world: int
    rank: int

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> TPGroup:
        return cls(group.group_name, None, dist.get_world_size(group), dist.get_rank(group))


class Once:
    """What one owner (a backend, a vLLM pass) has said: each thing is said the first time only."""

    def __init__(self) -> None:
        self._said: set[Hashable] = set()

    def new(self, things: list) -> list:
        """Those of `things` not said before, now marked said."""
        fresh = [t for t in dict.fromkeys(things) if t not in self._said]
        self._said.update(fresh)
        return fresh

    def say(self, say: Callable[..., None], message: str) -> None:
        if self.new([message]):
            say("%s", message)


class Configs:
    """The configs of one backend or pass, for its options; says once why a feature is off."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.once = Once()
        self._fusion: tuple | None = None  # (config or None,) once decided

    def sp(
        self, tp: TPGroup, min_tokens: int | str | None = None, group: str | None = None
    ) -> SPConfig | None:
        """The SP settings, or None when TP size is 1 or `batch_invariant` (nothing to rewrite,
        or a reduce-scatter would sum in another order than the all-reduce). `min_tokens` and
        `group` (the name the graph at hand uses) override the options' and `tp.name`."""
        if tp.world == 1:
            self.once.say(log.info, "fxsp: TP size 1, sequence parallelism has nothing to do")
            return None
        if self.options.batch_invariant:
            self.once.say(
                log.info,
                "fxsp: batch_invariant: sequence parallelism is off (a reduce-scatter "
                "sums in another order than an all-reduce, so results would depend on the batch)",
            )
            return None
        async_tp = self._async_tp(tp.c10d_name or tp.name)
        return SPConfig(
            group=tp.name if group is None else group,
            world=tp.world,
            rank=tp.rank,
            min_tokens=self.options.min_tokens if min_tokens is None else min_tokens,
            fp8=self.options.fp8,
            shard_outputs=self.options.shard_outputs,
            async_tp=async_tp,
            c10d_group=tp.c10d_name if async_tp else None,
        )

    def sp_for_graph(self, sp: SPConfig | None) -> SPConfig | None:
        """`sp` for the graph being compiled now: None where AOT autograd compiles it with a
        backward, said once. Such a graph returns what backward saves (each norm's rsqrt, full
        size), which keeps most sites from being rewritten."""
        if sp is not None and _compiled_for_autograd():
            self.once.say(
                log.warning,
                "fxsp: sequence parallelism found no site in a graph compiled with autograd "
                "(gradients enabled and an input or parameter requires grad): for training, "
                "fxsp rewrites the graph before AOT autograd where the model is parallelised "
                "with DTensor or its all-reduces are autograd functions (Megatron's f and g; "
                "docs/training.md), and backend.training_reports says why it did not here. For "
                "inference, compile under torch.no_grad() or torch.inference_mode(), or call "
                "requires_grad_(False) on the parameters.",
            )
            return None
        return sp

    def fusion(self, tp: TPGroup) -> AllReduceNormConfig | None:
        """The fused all-reduce + RMSNorm settings, or None where it is not asked for or the
        gate (`decide_allreduce_rms_fusion`) rules it out; decided once."""
        if self._fusion is None:
            # batch_invariant: the kernel's summation order depends on the rows.
            wanted = (
                self.options.allreduce_fusion and tp.world > 1 and not self.options.batch_invariant
            )
            allowed = (
                wanted and decide_allreduce_rms_fusion(tp.world, self.options.pipeline_size).enabled
            )
            config = AllReduceNormConfig(group=tp.name, world=tp.world, fp8=self.options.fp8)
            self._fusion = (config if allowed else None,)
        return self._fusion[0]

    def _async_tp(self, c10d_group: str) -> bool:
        """async_tp asked for and possible on the group. Asked each time: symmetric memory is
        per process, and a pass may be pickled into another."""
        if not self.options.async_tp:
            return False
        from .async_tp import enable_async_tp

        why_not = enable_async_tp(c10d_group)
        if why_not is not None:
            self.once.say(
                log.warning, f"fxsp: async_tp off, compiling without micro-pipeline TP: {why_not}"
            )
        return why_not is None


def decide_allreduce_rms_fusion(
    tp_size: int, pp_size: int = 1, device: DeviceLike = None
) -> FusionGate:
    """`policy.fusion.allreduce_rms_fusion_gate` for this machine (`device`: see
    `policy.thresholds.device_info`; None is the current device). Logs the reason at INFO when
    the fusion is off."""
    from ..ir.kernels.flashinfer import flashinfer_available

    info = device_info(device)
    # FlashInfer is checked last, and imported only when every other condition holds: importing
    # it can take seconds.
    gate = allreduce_rms_fusion_gate(tp_size, pp_size, info, flashinfer=True)
    if gate.enabled:
        gate = allreduce_rms_fusion_gate(tp_size, pp_size, info, flashinfer_available("comm"))
    if not gate.enabled:
        log.info("fxsp: AllReduce+RMSNorm fusion off: %s", gate.reason)
    return gate


def _compiled_for_autograd() -> bool:
    """Whether AOT autograd is compiling this graph with a backward (gradients enabled and an
    input or parameter requiring grad): its forward graph returns what backward saves."""
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    return bool(metadata is not None and metadata.traced_tangents)
