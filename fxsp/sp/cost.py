"""Does SP pay for itself at a site? A reduce-scatter and one all-gather move the bytes of the
all-reduce they replace; every further all-gather is more than plain TP sends.

`SiteCost.read_in_full` lists what a site's rewrite would have to all-gather: its output (unless
every reader takes this rank's chunk of it, as MoE does), and each value on the way from the
all-reduce or residual it passes on that a reader needs in full. A reader takes the shard
instead where it is itself a site that pays (the next norm's fused add, or an add ending the
region: `rules.SequenceParallel.end_rule_set`), or a graph output that stays sharded. Judged
from the graph's structure alone, so every rank judges alike.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ..dsl.fake import same_shape, tensor_of
from ..ir.collectives import vllm_op
from ..ir.ops import ALL_REDUCE, FUSED_ADD_NORMS
from .layout import padded_block_rows, provably_equal
from .rowwise import row_input

aten = torch.ops.aten


class SiteCost:
    """The all-gathers SP sites would need, for one SP config; readers judged once each."""

    def __init__(self, cfg) -> None:  # an SPConfig (rules.py imports this module)
        self.cfg = cfg
        self.pays: dict[Node, bool] = {}  # residual readers judged by `takes_the_shard`

    def read_in_full(self, root: Node, norm: Node, chain: list[Node]) -> list[tuple]:
        """(value, a reader) for each value a rewrite of the site would all-gather: its output
        (unless every reader takes this rank's chunk of it, as MoE does), the values on the way
        from the all-reduce (`chain`) and the residual it passes on, each where a reader needs it
        in full. Reduce-scatter plus one all-gather move the bytes of the all-reduce; every
        further all-gather is more than plain TP sends. Judged from the graph's structure, so
        every rank judges alike."""
        full = []
        outputs = _items(norm, 0) if root.target in FUSED_ADD_NORMS else [root]
        readers = [r for out in outputs for r in out.users]
        if not readers or not all(_takes_a_chunk(r, self.cfg.world) for r in readers):
            full.append((outputs[0] if outputs else root, readers[0] if readers else root))
        passed_on = [(node, {*chain, norm}) for node in chain] + [(i, ()) for i in _items(norm, 1)]
        for value, consumers in passed_on:
            reader = next(
                (
                    r
                    for r in value.users
                    if r not in consumers and not self.takes_the_shard(r, value)
                ),
                None,
            )
            if reader is not None:
                full.append((value, reader))
        return full

    def gathers_residual_once(self, norm: Node, chain: list[Node], full: list[tuple]) -> bool:
        """Whether gathering a fused add + norm's new residual once, before the norm and its
        other readers, is the only all-gather its site needs (no value on the way from the
        all-reduce is read in full: `full`, from `read_in_full`), and gains something: a later
        site takes the residual's shard."""
        if norm.target not in FUSED_ADD_NORMS or any(value in chain for value, _ in full):
            return False
        return any(self.takes_the_shard(r, item) for item in _items(norm, 1) for r in item.users)

    def all_gathers(self, root: Node, norm: Node, chain: list[Node]) -> int:
        """The fewest all-gathers a rewrite of the site needs, in either layout."""
        full = self.read_in_full(root, norm, chain)
        return 1 if len(full) > 1 and self.gathers_residual_once(norm, chain, full) else len(full)

    def takes_the_shard(self, reader: Node, value: Node) -> bool:
        """Whether `reader` can read `value`'s sharded twin: a graph output where outputs stay
        sharded, or the residual operand of a fused add + norm, or of a plain add (`sp.end`),
        whose other operand is an all-reduce over the TP group, where that site pays for itself
        (asked once per reader)."""
        if reader.op == "output":
            return self.cfg.shard_outputs
        if reader.target not in _RESIDUAL_READERS or value not in reader.args[:2]:
            return False
        if reader not in self.pays:
            self.pays[reader] = False  # a cycle would not pay
            x = reader.args[1] if reader.args[0] is value else reader.args[0]
            chain = chain_of(x) if isinstance(x, Node) else None
            self.pays[reader] = (
                chain is not None
                and chain[0].args[1] == self.cfg.group
                and same_shape(tensor_of(x), tensor_of(value))
                and self.all_gathers(reader, reader, chain) <= 1
            )
        return self.pays[reader]


def chain_of(h: Node) -> list[Node] | None:
    """The all-reduce `h` is read from and the row-wise ops on the way, all-reduce first;
    None where `h` is not an all-reduce behind row-wise ops."""
    chain = [h]
    while chain[-1].target is not ALL_REDUCE:
        previous = row_input(chain[-1])
        if not isinstance(previous, Node):
            return None
        chain.append(previous)
    return chain[::-1]


def _items(node: Node, index: int) -> list[Node]:
    """The `operator.getitem(node, index)` nodes reading a tuple-valued node."""
    return [u for u in node.users if u.target is operator.getitem and u.args[1] == index]


def _takes_a_chunk(reader: Node, tp: int) -> bool:
    """A reader keeping one rank's block of rows (MoE's chunk, see chunk.py), which takes the
    shard itself: vLLM's chunk op, or a slice of ceil(rows / tp) rows, padded or not (which
    block is the rank's own; its size is what every rank can judge alike)."""
    if reader.target is aten.constant_pad_nd.default:
        return bool(reader.users) and all(_takes_a_chunk(u, tp) for u in reader.users)
    if reader.target is aten.slice.Tensor and reader.args[1:2] == (0,):
        rows, block = tensor_of(reader.args[0]), tensor_of(reader)
        return (
            rows is not None
            and block is not None
            and rows.dim() == 2
            and provably_equal(block.shape[0], padded_block_rows(rows.shape[0], tp), tp)
        )
    chunk = vllm_op("sequence_parallel_chunk_impl")
    return chunk is not None and reader.target is chunk


# What can read a residual SP passes on sharded: a fused add + norm, or an add ending the region.
_RESIDUAL_READERS = FUSED_ADD_NORMS | {aten.add.Tensor}
