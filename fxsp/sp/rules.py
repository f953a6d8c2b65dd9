"""Sequence parallelism: AllReduce → (add +) norm becomes ReduceScatter → local norm → AllGather.

The rules, on fxsp's IR (every norm spelling is one op by now, see fxsp/ir/raising/); `norm` is
any kind in `ops.NORM_KINDS` (RMSNorm, LayerNorm), rewritten as its own op with its parameters:

    first   norm(all_reduce(x))                       ⇒ all_gather(norm(reduce_scatter(x)))
    middle  fused_add_norm(all_reduce(x), residual)   ⇒ all_gather(fused_add_norm(
                                                            reduce_scatter(x), rows(residual)))
    last    middle whose residual output is dead
    *_fp8   the same followed by static_fp8_quant: quantise locally, all-gather the FP8 bytes
    gather_once  middle whose new residual other norms read in full (parallel-residual blocks:
            GPT-NeoX's two LayerNorms of one residual) ⇒ all_gather(reduce_scatter(x) +
            rows(residual)), then the norm on every rank: one all-gather instead of one per norm

Between the all-reduce and the norm may stand ops that act on each row alone (decided by
fxsp/sp/rowwise.py: Granite's multipliers, Gemma's √H embedding scale, a reshape to
[1, T, H], casts, clones): the reduce-scatter takes the all-reduce's place and each such op
runs on the shard, `all_reduce(x) * c ⇒ reduce_scatter(x) * c`. An op mixing rows (cumsum or
softmax over the tokens, a matmul contracting over them) ends the search; the near-miss names it.

Each rank normalises 1/tp of the rows. Layouts are tracked so the graph is valid after every
single rewrite: a rewrite replaces every full-size value it touched by the all-gather of its
sharded twin and records the twin in `meta[SHARD]`; the residual a norm passes on keeps its
full-size computation instead, with the twin recorded, until the pass ends, when whatever still
reads it gets the all-gather (most residuals are read only by the next norm, which takes the
twin). A later rewrite whose residual is such a value takes the twin directly; any other
residual is replicated, and the rewrite slices this rank's rows. All-gathers left without users
are removed by fxsp/cleanup, so a sharded residual flows from norm to norm, and every other
consumer (graph outputs, ops no rule covers) still sees full-size values.

SP must pay for itself. A reduce-scatter and one all-gather move the bytes of the all-reduce;
any further all-gather (a residual or an intermediate value read in full outside the region: a
graph output, an op no rule covers, a norm that is not a site or does not pay) is more than
plain TP sends. `cost.SiteCost.read_in_full` counts them from the graph's structure before a
rewrite. Where they are the norm's output and the new residual, gathering the residual once
before the norms (`gather_once`) moves the all-reduce's bytes again, and the residual stream
stays sharded; any other site that would need more stays as it is, with the near-miss naming
the readers.

Row layout (fxsp/sp/rows.py): the region lives in padded rows, and the pad, trim and
flattening views go where they do not stand between a collective and its matmul, so Inductor's
micro-pipeline TP can fuse `mm → reduce_scatter` and `all_gather → mm` at every site.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from ..dsl.builder import Builder, erase_unused
from ..dsl.fake import known_true, tensor_of
from ..dsl.pattern import behind, getitem, op, such_that
from ..dsl.rules import Match, Rule, RuleSet
from ..ir.collectives import all_gather_rows, reduce_scatter_rows, vllm_op
from ..ir.ops import FP8_DTYPES, STATIC_FP8_QUANT, norm_of
from ..policy.thresholds import sp_min_tokens
from . import site
from .cost import SiteCost, chain_of
from .rows import (
    RowBlocks,
    from_padded_rows,
    matmuls_on_padded_rows,
    pinned_by_one_row_blocks,
    row_blocks,
    row_count,
    shaped_like,
    this_rank_rows,
    to_padded_rows,
)
from .rowwise import ORDER_KEEPING_VIEWS, row_input

aten = torch.ops.aten

SHARD = "fxsp_shard"  # meta key on a full-size value: (its sharded twin, group, tp size)


@dataclass(frozen=True)
class SPConfig:
    """What the SP rules need to know; everything but `rank` is the same on every rank."""

    group: str  # only all-reduces over this process group are rewritten
    world: int  # TP size
    rank: int  # only used for slice offsets of replicated residuals
    min_tokens: int | str = 0  # rows below this keep the all-reduce; "auto": policy.thresholds
    fp8: bool = True
    # Accept symbolic row counts whatever the threshold, reporting each (rows, threshold) so
    # the backend can pick this variant or a non-SP one per call (see runtime.row_dispatch).
    dispatch: bool = False
    # Return values fxsp gathered from a shard stay sharded (pipeline stage boundaries: the next
    # stage gathers them with runtime.gather_rows, or takes them as they are).
    shard_outputs: bool = False
    # Micro-pipeline TP will fuse the collectives (compile.async_tp): FP8 is all-gathered as FP8,
    # the shard its fused scaled matmul takes (NCCL carries FP8 bytes as they are).
    async_tp: bool = False
    # Emit c10d collectives over this group for vLLM's all-reduces: micro-pipeline TP knows only
    # c10d's (vLLM's TP device group; see adapters/vllm.py).
    c10d_group: str | None = None


# --- patterns ----------------------------------------------------------------------------------

# The norm's input (see site.py): the all-reduce, or the all-reduce behind ops that
# act on each row alone (a scale, a cast, a clone, a reshape to [1, T, H]); the shard passes
# through them too.
reduced_rows = behind(site.reduced, row_input, "ops acting on each row alone", name="h")


def residual_used(norm: Node) -> bool:
    """Whether a fused add + norm's second output, the new residual, is read."""
    return any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in norm.users)


first_norm = site.norm(reduced_rows)
# A middle norm passes its residual on; the last one's is dead.
middle_norm = such_that(site.fused_add_norm(reduced_rows), residual_used, "(residual output used)")
last_norm = such_that(
    site.fused_add_norm(reduced_rows),
    lambda n: not residual_used(n),
    "(residual output unused)",
)
# The residual stream leaving the region through a plain add (see `end_rule_set`).
residual_add = op(aten.add.Tensor, reduced_rows, site.residual, name="norm")
first_fp8 = site.static_fp8_quant(first_norm)
middle_fp8 = site.static_fp8_quant(getitem(middle_norm, 0))
last_fp8 = site.static_fp8_quant(getitem(last_norm, 0))


# --- rewrites ----------------------------------------------------------------------------------


def sp_rules(cfg: SPConfig, row_thresholds: list | None = None) -> RuleSet:
    """The SP rule set. With `cfg.dispatch`, (symbolic rows, threshold) pairs of accepted
    matches are appended to `row_thresholds`."""
    return SequenceParallel(cfg, row_thresholds).rule_set()


@dataclass(frozen=True)
class Collectives:
    """How one site's collectives are written: over `group` in the `flavor` family. `tp_group`
    is the name the site's all-reduce gives the TP group, which twins record."""

    tp_group: str
    group: str
    flavor: str


@dataclass
class PassedOn:
    """A middle site's full-size residual, passed on as its shard: gathered at the end for
    whatever still reads it, after the nodes its site `made`, as if made there."""

    residual: Node
    blocks: RowBlocks
    collectives: Collectives
    made: set


class SequenceParallel:
    """One application of the SP rules: the rewrites, and what they leave for the end of the
    pass (the residuals passed on sharded, the norms already rewritten)."""

    def __init__(self, cfg: SPConfig, row_thresholds: list | None = None) -> None:
        self.cfg = cfg
        self.row_thresholds = row_thresholds
        self.passed_on: list[PassedOn] = []
        # Norms rewritten whose full-size residual stays until the end: never a site again (the
        # non-FP8 rule also matches a norm its FP8 rule rewrote).
        self.rewritten: set[Node] = set()
        self.cost = SiteCost(cfg)

    def rule_set(self) -> RuleSet:
        applies, first, middle = self.applies, self.first, self.middle
        rules = [
            # The all-reduce's other users get its gathered rows (see `scatter`).
            Rule("sp.first_fp8", first_fp8, first, outputs=("reduced",), where=applies),
            Rule("sp.middle_fp8", middle_fp8, middle, outputs=("reduced", "norm"), where=applies),
            Rule("sp.last_fp8", last_fp8, middle, outputs=("reduced", "norm"), where=applies),
            Rule("sp.first", first_norm, first, outputs=("reduced",), where=applies),
            Rule("sp.middle", middle_norm, middle, outputs=("reduced",), where=applies),
            Rule("sp.last", last_norm, middle, outputs=("reduced",), where=applies),
            Rule("sp.gather_once", middle_norm, self.gather_once, where=self.gathers_once),
        ]
        fp8 = self.cfg.fp8
        return RuleSet(
            "sp", [r for r in rules if fp8 or not r.name.endswith("_fp8")], self.gather_residuals
        )

    # --- checks ---------------------------------------------------------------------------------

    def applies(self, m: Match) -> bool | str:
        if m["norm"] in self.rewritten:
            return "its norm was rewritten already"
        verdict = site.applicable(m, self.cfg.group, self.enough_rows)
        if verdict is not True:
            return verdict
        full = self.cost.read_in_full(m.root, m["norm"], chain_of(m["h"]))
        if len(full) > 1:  # a reduce-scatter and all-gathers against one all-reduce
            return _more_than_the_all_reduce(full)
        return True

    def gathers_once(self, m: Match) -> bool | str:
        """Where `applies` finds more than one all-gather: whether gathering the new residual
        once, before the norm and its other readers, is the one all-gather."""
        if m["norm"] in self.rewritten:
            return "its norm was rewritten already"
        verdict = site.applicable(m, self.cfg.group, self.enough_rows)
        if verdict is not True:
            return verdict
        chain = chain_of(m["h"])
        full = self.cost.read_in_full(m.root, m["norm"], chain)
        if len(full) <= 1:
            return "one all-gather of the norm's output suffices (sp.middle)"
        if not self.cost.gathers_residual_once(m["norm"], chain, full):
            return f"{_more_than_the_all_reduce(full)}; no later site takes the residual's shard"
        return True

    def enough_rows(self, m: Match, t: torch.Tensor) -> bool | str:
        """SP pays from `cfg.min_tokens` rows; the rows must reach the norm as they are."""
        cfg = self.cfg
        if m["flavor"] == "vllm" and vllm_op("reduce_scatter") is None:
            return "vLLM collectives are not loaded"
        if t.dim() < 2:
            return f"activation of rank {t.dim()} has no token dim"
        rows = row_count(t)
        if not known_true(rows == row_count(tensor_of(m["h"]))):
            return f"{m['h'].name} holds other rows than the all-reduce"
        if not isinstance(rows, int) and pinned_by_one_row_blocks(rows, cfg.world):
            return (
                f"the example's {rows.node.hint} rows give each of {cfg.world} ranks one row at "
                "most: torch would specialise the token dim marked dynamic"
            )
        need = site.row_threshold(cfg.min_tokens, sp_min_tokens, t, cfg.world)
        if isinstance(need, str):
            return need
        if isinstance(rows, int) and rows < need:
            return f"{rows} rows < min_tokens {need}"
        if not isinstance(rows, int) and need > 0:
            if not cfg.dispatch or self.row_thresholds is None:
                return f"symbolic rows may fall below min_tokens {need}"
            self.row_thresholds.append((rows.node.expr, need))
        return True

    # --- rewrites -------------------------------------------------------------------------------

    def first(self, b: Builder, m: Match) -> None:
        """norm(all_reduce(x)) ⇒ all_gather(norm(reduce_scatter(x)))"""
        blocks, scattered, chain = self.scatter(b, m)
        norm = m["norm"]  # any kind: its own op, its parameters (weight, bias, eps) as they are
        normed = b.call(norm.target, scattered, *norm.args[1:])
        out = self.gather(b, _quantised(b, m, normed), blocks, self.collectives(m))
        b.replace(m.root, out)
        matmuls_on_padded_rows(b, out, blocks)
        _erase_site(m, chain)

    def middle(self, b: Builder, m: Match) -> None:
        """fused_add_norm(all_reduce(x), residual)
        ⇒ all_gather(fused_add_norm(reduce_scatter(x), rows(residual)))"""
        blocks, scattered, chain = self.scatter(b, m)
        rows = self.rows_of(b, m["residual"], blocks, m["group"])
        norm = m["norm"]  # x and the residual first (the sum commutes), then its parameters
        fused = b.call(norm.target, scattered, rows, *norm.args[2:])
        normed, residual_out = (
            b.call(operator.getitem, fused, 0),
            b.call(operator.getitem, fused, 1),
        )
        out = self.gather(b, _quantised(b, m, normed), blocks, self.collectives(m))
        if "fp8_dtype" in m.bindings:
            b.replace(m.root, out)
        else:
            b.replace_items(m["norm"], {0: out})
        matmuls_on_padded_rows(b, out, blocks)
        if residual_used(m["norm"]):
            # The next norm takes the residual's shard, its twin. Until then the full-size
            # residual stays as it was (the graph stays valid); `gather_residuals` gives
            # whatever else reads it the gathered shard when the pass ends.
            self.rewritten.add(m["norm"])
            for item in m["norm"].users:
                if item.target is operator.getitem and item.args[1] == 1:
                    item.meta[SHARD] = (residual_out, m["group"], self.cfg.world)
                    self.passed_on.append(PassedOn(item, blocks, self.collectives(m), b.created))
        _erase_site(m, chain)

    def gather_once(self, b: Builder, m: Match) -> None:
        """fused_add_norm(all_reduce(x), residual) ⇒ norm(full), with
        full = all_gather(reduce_scatter(x) + rows(residual)) the new residual, its twin the
        shard: the norm and every other reader of the residual read it in full, the next site
        takes the shard."""
        blocks, scattered, chain = self.scatter(b, m)
        rows = self.rows_of(b, m["residual"], blocks, m["group"])
        full = self.gather(b, b.call(aten.add.Tensor, scattered, rows), blocks, self.collectives(m))
        norm = m["norm"]
        normed = b.call(norm_of(norm.target), full, *norm.args[2:])
        b.replace_items(norm, {0: normed, 1: full})
        matmuls_on_padded_rows(b, full, blocks)
        _erase_site(m, chain)

    def gather_residuals(self, graph: torch.fx.Graph) -> None:
        """Each full-size residual passed on sharded: what still reads it (not a later site,
        whose old norm is gone by then) reads the all-gather of its shard instead, and the
        full-size computation is erased. Latest first: a site's old norm reads the residual
        before it."""
        for passed in reversed(self.passed_on):
            residual = passed.residual
            if residual.users:
                b = Builder(graph)
                b.created |= passed.made
                full = self.gather(b, residual.meta[SHARD][0], passed.blocks, passed.collectives)
                b.replace(residual, full)
                matmuls_on_padded_rows(b, full, passed.blocks)
            erase_unused([residual], inputs=True)
        self.passed_on.clear()
        self.rewritten.clear()
        self.cost.pays.clear()

    # --- the region's end ------------------------------------------------------------------

    def end_rule_set(self) -> RuleSet:
        """`sp.end`, run after the SP rules: the residual stream leaving the region through an
        add of an all-reduce (a model without a final norm in this graph) takes the residual's
        shard, `all_reduce(x) + residual ⇒ all_gather(reduce_scatter(x) + shard)`: the bytes of
        the all-reduce, where gathering the residual for the add would be one all-gather more."""
        return RuleSet("sp.end", [Rule("sp.end", residual_add, self.end, where=self.ends)])

    def ends(self, m: Match) -> bool | str:
        twin = sharded_twin(m["residual"])
        if twin is None or twin[1:] != (m["group"], self.cfg.world):
            return f"{m['residual'].name} is not a residual SP passed on sharded"
        verdict = site.applicable(m, self.cfg.group, self.enough_rows)
        if verdict is not True:
            return verdict
        full = self.cost.read_in_full(m.root, m.root, chain_of(m["h"]))
        return len(full) <= 1 or f"SP would send more than the all-reduce: {len(full)} all-gathers"

    def end(self, b: Builder, m: Match) -> None:
        """all_reduce(x) + residual ⇒ all_gather(reduce_scatter(x) + rows(residual))"""
        blocks, scattered, chain = self.scatter(b, m)
        rows = self.rows_of(b, m["residual"], blocks, m["group"])
        out = self.gather(b, b.call(aten.add.Tensor, scattered, rows), blocks, self.collectives(m))
        b.replace(m.root, out)
        matmuls_on_padded_rows(b, out, blocks)
        _erase_site(m, chain)

    # --- steps ----------------------------------------------------------------------------------

    def scatter(self, b: Builder, m: Match) -> tuple[RowBlocks, Node, list[Node]]:
        """Reduce-scatter the all-reduce's input, and apply each row-wise op between the
        all-reduce and the norm (`chain`, from the all-reduce on) to the shard: the same op on
        this rank's rows. Every other user of a value on the way gets its gathered rows,
        remembered with the shard as its twin: a later rewrite takes the shard, and cleanup drops
        the unused gather. Returns the blocks in the norm input's shape, the norm input's shard
        and the chain."""
        collectives = self.collectives(m)
        blocks = row_blocks(b, m["x"], self.cfg.world)
        padded = to_padded_rows(b, m["x"], blocks, through_matmul=True)
        shard = reduce_scatter_rows(
            b, padded, self.cfg.world, collectives.group, collectives.flavor
        )
        chain = [m["h"]]
        while chain[-1] is not m["reduced"]:
            chain.append(row_input(chain[-1]))
        chain.reverse()
        shards, shapes = {m["reduced"]: shard}, {m["reduced"]: blocks}
        for node in chain[1:]:
            rows = row_input(node)
            shards[node] = _on_shard(b, node, rows, shards[rows])
            shapes[node] = (
                shapes[rows]
                if node.target not in ORDER_KEEPING_VIEWS
                else shaped_like(b, blocks, node)
            )
        consumers = {*chain, m["norm"]}
        for node in chain:
            others = [u for u in node.users if u not in consumers]
            if others:
                full = self.gather(b, shards[node], shapes[node], collectives)
                node.replace_all_uses_with(full, delete_user_cb=lambda u: u in others)
                matmuls_on_padded_rows(b, full, shapes[node])
        return shapes[m["h"]], shards[m["h"]], chain

    def gather(self, b: Builder, shard: Node, blocks: RowBlocks, collectives: Collectives) -> Node:
        """The full-size value of `shard`, remembered as its twin for later rewrites.

        FP8 travels as uint8: the same bytes, and every backend (gloo, NCCL) can carry them;
        except for async TP, whose fused all-gather + scaled matmul needs the FP8 shard itself."""
        world, spelling = self.cfg.world, (collectives.group, collectives.flavor)
        dt = tensor_of(shard).dtype
        if dt in FP8_DTYPES and not self.cfg.async_tp:
            as_bytes = b.call(aten.view.dtype, shard, torch.uint8)
            gathered = b.call(aten.view.dtype, all_gather_rows(b, as_bytes, world, *spelling), dt)
        else:
            gathered = all_gather_rows(b, shard, world, *spelling)
        full = from_padded_rows(b, gathered, blocks)
        full.meta[SHARD] = (shard, collectives.tp_group, world)
        return full

    def rows_of(self, b: Builder, residual: Node, blocks: RowBlocks, group: str) -> Node:
        """This rank's rows of `residual`: its sharded twin if a rewrite made one, else a slice."""
        twin = sharded_twin(residual)
        if twin is not None and twin[1:] == (group, self.cfg.world):
            return twin[0]
        return this_rank_rows(b, to_padded_rows(b, residual, blocks), blocks, self.cfg.rank)

    def collectives(self, m: Match) -> Collectives:
        """The collectives replacing the site's all-reduce: of its family over its group, or
        c10d's over the TP device group where async TP asks for c10d collectives for vLLM's."""
        if m["flavor"] == "vllm" and self.cfg.c10d_group is not None:
            return Collectives(m["group"], self.cfg.c10d_group, "c10d")
        return Collectives(m["group"], m["group"], m["flavor"])


def sharded_twin(value: Node) -> tuple[Node, str, int] | None:
    """(sharded twin, group, tp size) of a full-size value an SP rewrite gathered, if still
    there."""
    twin = value.meta.get(SHARD)
    return None if twin is None or twin[0]._erased else twin


def shard_graph_outputs(graph: torch.fx.Graph) -> int:
    """Return the sharded twin of every output fxsp gathered: this rank's block of the padded
    rows instead of the full value. Returns how many outputs changed."""
    output = graph.output_node()
    changed = 0

    def sharded(value):
        nonlocal changed
        twin = sharded_twin(value) if isinstance(value, Node) else None
        if twin is None:
            return value
        changed += 1
        return twin[0]

    output.args = (torch.fx.node.map_aggregate(output.args[0], sharded),)
    return changed


def _on_shard(b: Builder, node: Node, rows: Node, shard: Node) -> Node:
    """`node` applied to `shard`, the [per_rank, H] rows of its input `rows`: a row-keeping
    view is the identity, and an operand broadcast along rows loses its leading 1s."""
    if node.target in ORDER_KEEPING_VIEWS:
        return shard

    def on_shard(a):
        if a is rows:
            return shard
        t = tensor_of(a) if isinstance(a, Node) else None
        if t is not None and t.dim() > 1:  # [1, H], [1, 1, H] → [H], whatever the shard's rank
            return b.call(aten.squeeze.dims, a, list(range(t.dim() - 1)))
        return a

    return b.call(
        node.target, *map(on_shard, node.args), **{k: on_shard(v) for k, v in node.kwargs.items()}
    )


def _more_than_the_all_reduce(full: list[tuple]) -> str:
    readers = ", ".join(f"{value.name} (read by {reader.name})" for value, reader in full)
    return f"SP would send more than the all-reduce: {len(full)} all-gathers, of {readers}"


def _erase_site(m: Match, chain: list[Node]) -> None:
    """Erase the replaced root and norm (with the items of it nobody reads), then the chain they
    leave without users (the all-reduce included: a dead collective would still run)."""
    items = [u for u in m["norm"].users if u.target is operator.getitem]
    erase_unused([*items, m.root, m["norm"], *reversed(chain)])


def _quantised(b: Builder, m: Match, normed: Node) -> Node:
    quant = site.quant_args(m)
    return b.call(STATIC_FP8_QUANT, normed, *quant) if quant else normed
