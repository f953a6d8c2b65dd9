"""From options and a TP group to what the rule sets take: `SPConfig` and `AllReduceNormConfig`.

    configs = Configs(Options(min_tokens=0))
    configs.sp(TPGroup.of(process_group))  # -> SPConfig(group="0", world=2, rank=1, min_tokens=0, ...)

The torch.compile backend (`fxsp.backend`) and the vLLM adapter (`FxspVllmPass`) both build their
configs here, so an option means the same in both. Options are either's dataclass: the adapter's
has no `shard_outputs`, `batch_invariant`, `allreduce_fusion` or `pipeline_size`, and reads as
their defaults with the fusion off (vLLM runs its own).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from .patterns.allreduce_norm import AllReduceNormConfig
from .patterns.sp import SPConfig
from .runtime.fusion import decide_allreduce_rms_fusion

log = logging.getLogger("fxsp")


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


class Configs:
    """The configs of one backend or pass, for its options; says once why a feature is off."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self._said: set[str] = set()
        self._fusion: tuple | None = None  # (config or None,) once decided

    def sp(self, tp: TPGroup, min_tokens: int | str | None = None, group: str | None = None) -> SPConfig | None:
        """The SP settings, or None when TP size is 1 or `batch_invariant` (nothing to rewrite,
        or a reduce-scatter would sum in another order than the all-reduce). `min_tokens` and
        `group` (the name the graph at hand uses) override the options' and `tp.name`."""
        if tp.world == 1:
            self._say_once(log.info, "fxsp: TP size 1, sequence parallelism has nothing to do")
            return None
        if getattr(self.options, "batch_invariant", False):
            self._say_once(log.info, "fxsp: batch_invariant: sequence parallelism is off (a reduce-scatter "
                           "sums in another order than an all-reduce, so results would depend on the batch)")
            return None
        async_tp = self._async_tp(tp.c10d_name or tp.name)
        return SPConfig(group=tp.name if group is None else group, world=tp.world, rank=tp.rank,
                        min_tokens=self.options.min_tokens if min_tokens is None else min_tokens,
                        fp8=self.options.fp8, shard_outputs=getattr(self.options, "shard_outputs", False),
                        async_tp=async_tp, c10d_group=tp.c10d_name if async_tp else None)

    def fusion(self, tp: TPGroup) -> AllReduceNormConfig | None:
        """The fused all-reduce + RMSNorm settings, or None where it is not asked for or
        runtime.fusion rules it out (which logs why); decided once."""
        if self._fusion is None:
            # batch_invariant: the kernel's summation order depends on the rows.
            wanted = getattr(self.options, "allreduce_fusion", False) and tp.world > 1 \
                and not getattr(self.options, "batch_invariant", False)
            allowed = wanted and decide_allreduce_rms_fusion(tp.world, getattr(self.options, "pipeline_size", 1)).enabled
            config = AllReduceNormConfig(group=tp.name, world=tp.world, fp8=self.options.fp8)
            self._fusion = (config if allowed else None,)
        return self._fusion[0]

    def _async_tp(self, c10d_group: str) -> bool:
        """async_tp asked for and possible on the group. Asked each time: symmetric memory is
        per process, and a pass may be pickled into another."""
        if not self.options.async_tp:
            return False
        from .runtime.async_tp import enable_async_tp

        why_not = enable_async_tp(c10d_group)
        if why_not is not None:
            self._say_once(log.warning, f"fxsp: async_tp off, compiling without micro-pipeline TP: {why_not}")
        return why_not is None

    def _say_once(self, say: Any, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            say("%s", message)
