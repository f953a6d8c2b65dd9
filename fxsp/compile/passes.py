"""The passes every compiled graph goes through: raise → rewrite → clean up → lower."""

from __future__ import annotations

from torch.fx import Graph

from ..cleanup import noop_rules, remove_dead_code
from ..dsl.golden import Snapshot
from ..ir.lowering import lower_ir
from ..ir.raising import raise_ir
from ..sp.allreduce_norm import AllReduceNormConfig, allreduce_norm_rules
from ..sp.chunk import chunk_rules
from ..sp.rules import SequenceParallel, SPConfig, shard_graph_outputs, sp_rules
from .report import GraphReport
from .stats import collective_signature, traffic


def run_passes(
    graph: Graph,
    sp: SPConfig | None,
    explain: bool = False,
    fusion: AllReduceNormConfig | None = None,
) -> GraphReport:
    """Rewrite `graph` in place: SP where `sp` is given, the small-batch fusion where `fusion`
    is; `explain` logs every rule's best near-miss. Returns what was done."""
    report = GraphReport(before=Snapshot(graph))
    sent = traffic(graph)  # what plain TP sends: before raising folds sums of all-reduces
    for r in raise_ir(graph):
        report._add(r)
    report._add(noop_rules().apply(graph))  # an identity reshape must not hide a norm's input
    report.traffic_before = traffic(graph).sending(sent)
    if sp is not None:
        report._add(sp_rules(sp, report.row_thresholds).apply(graph))
        ending = SequenceParallel(sp, report.row_thresholds).end_rule_set()
        report._add(ending.apply(graph))  # the residual stream leaving through an add
        report._add(chunk_rules(sp).apply(graph))  # MoE's chunk of a sharded value: the shard
        if sp.shard_outputs:
            report.counts["sp.sharded_outputs"] = shard_graph_outputs(graph)
    if fusion is not None:  # after SP: SP takes the large batches, the fusion what is left
        report._add(allreduce_norm_rules(fusion).apply(graph))
    remove_dead_code(graph)
    report._add(noop_rules().apply(graph))
    report.rewritten = Snapshot(graph)
    report.traffic_after = traffic(graph)
    lower_ir(graph)
    remove_dead_code(graph)
    graph.lint()
    report.after = Snapshot(graph)
    report.collectives = collective_signature(graph)
    if explain:
        report.log_near_misses()
    return report
