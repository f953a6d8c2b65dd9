"""Chunk folding: this rank's block of a value SP already holds sharded is that shard.

MoE models split the tokens across the TP ranks after the norm that follows the attention's
all-reduce: pad the rows to a multiple of the TP size, keep this rank's block (vLLM's
`sequence_parallel_chunk`, i.e. the op `vllm.sequence_parallel_chunk_impl`; in plain torch
`F.pad` + `narrow` / a slice). Once the SP rules have rewritten that norm, the value is an
all-gather of its sharded twin (`sp.SHARD`), and the chunk slices the gathered rows again:

    chunk(all_gather(shard))  ⇒  shard              (the all-gather then has no user and goes)

The twin is exactly the chunk when both hold the same rows: the same TP group and size, a value
of two dims (the chunk pads dim 0, SP the flattened rows) and ceil(rows / tp) rows per rank.
vLLM's op keeps that many by definition; a plain slice must provably start at this rank's block
(symbolic row counts are compared residue by residue, `layout.provably_equal`; where even that
fails, the chunk stays, gathered, with the reason in the report). The padding rows agree too:
the chunk pads with zeros, and the twin's padding rows are the local norm of zero rows, zero for
any eps > 0 (the fxsp norm rules only take eps > 0).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from ..dsl.builder import Builder
from ..dsl.fake import same_shape, tensor_of
from ..dsl.pattern import alt, anything, op, tensor
from ..dsl.rules import Match, Rule, RuleSet
from .layout import block_bounds, padded_block_rows, provably_equal
from .rules import SPConfig, sharded_twin

aten = torch.ops.aten


def chunk_rules(cfg: SPConfig) -> RuleSet:
    """The chunk-folding rules for SP config `cfg` (run right after the SP rules)."""

    def twin_of(m: Match) -> Node | str:
        full = m["full"]
        twin = sharded_twin(full)
        if twin is None:
            return f"{full.name} has no sharded twin (no SP rewrite produced it)"
        shard, group, world = twin
        if (group, world) != (cfg.group, cfg.world):
            return f"its twin is sharded over group {group!r} of {world}, not the TP group"
        value, sharded = tensor_of(full), tensor_of(shard)
        if value.dim() != 2:
            return "the chunk pads dim 0 of a value with more token dims; SP shards flattened rows"
        rows, per_rank = value.shape[0], sharded.shape[0]
        # The chunk's layout, ceil(rows / tp) rows per rank, must be the twin's.
        if not (
            provably_equal(per_rank, padded_block_rows(rows, world), world)
            and same_shape(sharded[0], value[0])
        ):
            return f"the twin's {per_rank} rows per rank are not ceil({rows} / {world})"
        return shard

    def is_vllm_chunk(m: Match) -> bool | str:
        twin = twin_of(m)
        return twin if isinstance(twin, str) else True

    def is_this_ranks_block(m: Match) -> bool | str:
        twin = twin_of(m)
        if isinstance(twin, str):
            return twin
        pad = m.get("pad")
        if pad is not None and (len(pad) != 4 or any(p != 0 for p in pad[:3])):
            return f"padding {list(pad)} does not only append rows"
        per_rank = tensor_of(twin).shape[0]
        sliced, sharded = tensor_of(m.root).shape, tensor_of(twin).shape
        if len(sliced) != len(sharded) or not all(
            provably_equal(a, b, cfg.world) for a, b in zip(sliced, sharded)
        ):
            return f"the slice has shape {list(sliced)}, the twin {list(sharded)}"
        start, end = _size(m["start"]), _size(m["end"])
        if start is None or end is None:
            return "the slice bounds are not sizes"
        block = block_bounds(per_rank, cfg.rank)
        if not all(provably_equal(a, b, cfg.world) for a, b in zip((start, end), block)):
            return f"rows [{start}, {end}) are not rank {cfg.rank}'s block of {per_rank} rows"
        return True

    def fold(b: Builder, m: Match) -> Node:
        return twin_of(m)

    full = tensor("full")
    padded = alt(op(aten.constant_pad_nd.default, full, anything("pad")), full)
    rules = [
        Rule(
            "chunk.slice",
            op(aten.slice.Tensor, padded, 0, anything("start"), anything("end")),
            fold,
            where=is_this_ranks_block,
        )
    ]
    vllm_chunk = _vllm_chunk_op()
    if vllm_chunk is not None:
        rules.append(Rule("chunk.vllm", op(vllm_chunk, full), fold, where=is_vllm_chunk))
    return RuleSet("chunk", rules)


def _size(value: object) -> object:
    """An int, or the SymInt a node computes; None for anything else."""
    if isinstance(value, Node):
        value = value.meta.get("val")
    return value if isinstance(value, (int, torch.SymInt)) else None


def _vllm_chunk_op() -> object:
    try:
        return torch.ops.vllm.sequence_parallel_chunk_impl.default
    except (AttributeError, RuntimeError):
        return None
