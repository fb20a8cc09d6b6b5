"""`partition()`: model + tiers + objective -> verified slices and a plan.

This is the partitioner's Python API; `wpk-partition` is a thin CLI over it. `execute` takes
a `PartitionRequest`; `partition(...)` is the same with the request's fields as keywords.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from wpk.errors import ParameterError, WpkError
from wpk.files import check_outputs
from wpk.graph import Graph
from wpk.plan import BATCHING_VERSION, LinkPlan, Objective, Plan, SourceModel, TierPlan
from wpk.tiers import Tiers, load_tiers
from wpk.partitioner import leakage_plan, search, slicing
from wpk.partitioner.batch import BatchView, batch_view, pair_measured, with_batching
from wpk.partitioner.costs import Efficiency, TierCosts, calibrate, estimated_costs
from wpk.partitioner.leakage import LeakageReport
from wpk.partitioner.request import OBJECTIVES, PRIVACY_MODES, PartitionRequest

__all__ = ["OBJECTIVES", "PRIVACY_MODES", "Configuration", "PartitionRequest", "PartitionResult",
           "build_problem", "execute", "partition", "write_plan"]


@dataclass
class Configuration:
    """One candidate: a machine per tier and the cut found for it."""

    machines: tuple[TierCosts, ...]
    problem: search.Problem              # the search problem for these machines
    evaluation: search.Evaluation

    def key(self, objective: str) -> tuple:
        e = self.evaluation
        if objective == "throughput":
            return (round(e.bottleneck_ms, 9), e.latency_ms)
        if objective == "bandwidth":
            return (e.bytes_beyond_edge, e.latency_ms)
        return (round(e.latency_ms, 9), e.bytes_beyond_edge)


@dataclass
class PartitionResult:
    graph: Graph
    tiers: Tiers
    problem: search.Problem
    best: Configuration
    plan: Plan
    pieces: list[slicing.TierSlice]      # what each tier of the plan does, in plan order
    objective: str
    single_tier: dict[str, search.Evaluation]
    top: list[Configuration] = field(default_factory=list)
    front: list[search.Evaluation] = field(default_factory=list)
    out_dir: Path | None = None
    batch: BatchView | None = None       # with --max-batch: what can batch, and its costs
    # with --pareto and leakage measured: (latency ms, highest figure leaving the device, tiers)
    leakage_front: list[tuple[float, float | None, np.ndarray]] = field(default_factory=list)
    leakage_metric: str = "dcor"


def build_problem(graph: Graph, tiers: Tiers, costs: Sequence[TierCosts], *,
                  privacy: bool = True, deliver_to: int = 0,
                  pins: Mapping[str, str] | None = None,
                  batch: BatchView | None = None,
                  private: frozenset[str] = frozenset()) -> search.Problem:
    """The search problem: compute per node and tier, tensors, links, constraints; with
    `batch` (and costs that have `batched_ms`), tiers may run batches; tensors in
    `private` may not cross the device's link."""
    n, n_tiers = len(graph.nodes), len(tiers)
    node_ms = np.column_stack([c.node_ms for c in costs]) if n else np.zeros((0, n_tiers))
    tensors = _tensor_edges(graph, batch)
    lowest = np.zeros(n, dtype=int)
    highest = np.full(n, n_tiers - 1, dtype=int)
    if privacy:
        shipped = [name for name in graph.inputs if name in graph.outputs]
        if shipped and deliver_to > 0:
            raise ParameterError(f"impossible constraint: output {shipped[0]!r} is the raw "
                                 f"input, which must stay on the device, but results go to "
                                 f"{tiers[deliver_to].name} ({{privacy}} none allows it)",
                                 "privacy")
        for name in graph.inputs:
            for consumer in graph.consumers.get(name, ()):
                highest[consumer] = 0
    for node_name, tier_name in (pins or {}).items():
        v = graph.node(node_name).index
        t = tiers.index(tier_name)
        if t < lowest[v] or t > highest[v]:
            raise WpkError(f"node {node_name} cannot be pinned to {tier_name}: it reads the "
                           "raw input, which must stay on the device")
        lowest[v] = highest[v] = t
    _check_pins_consistent(graph, lowest, highest, tiers)
    links = tiers.links
    per_byte = np.array([8.0 / (l.bandwidth_mbps * 1e6) * 1e3 * l.byte_factor for l in links])
    rtt = np.array([l.rtt_ms for l in links])
    beyond = np.array([tiers[k].role == "cloud" or tiers[k + 1].role == "cloud"
                       for k in range(len(links))], dtype=bool)
    problem = search.Problem(node_ms, tensors, per_byte, rtt, beyond, lowest, highest,
                             deliver_to, private=private)
    if batch is not None and batch.max_batch > 1 and n:
        problem.batched_ms = np.column_stack([c.batched_ms for c in costs])
        problem.batchable = batch.batchable.copy()
        problem.max_batch = batch.max_batch
    return problem


def _tensor_edges(graph: Graph, batch: BatchView | None) -> list[search.TensorEdge]:
    """Every tensor that something reads or that the model gives, as the search sees it."""
    carrying = batch.carries_batch if batch is not None else None
    tensors = []
    for name in list(graph.inputs) + [o for node in graph.nodes for o in node.outputs]:
        consumers = tuple(graph.consumers.get(name, ()))
        is_output = name in graph.outputs
        if not consumers and not is_output:
            continue
        tensors.append(search.TensorEdge(name, graph.tensor_bytes(name),
                                         graph.producer.get(name, -1), consumers, is_output,
                                         carrying is None or name in carrying))
    return tensors


def _check_pins_consistent(graph: Graph, lowest: np.ndarray, highest: np.ndarray,
                           tiers: Tiers) -> None:
    """Propagate bounds along edges; a node whose range empties means the pins contradict."""
    low, high = lowest.copy(), highest.copy()
    for node in graph.nodes:                       # forward: a consumer is never earlier
        for tensor in node.inputs:
            p = graph.producer.get(tensor)
            if p is not None:
                low[node.index] = max(low[node.index], low[p])
    for node in reversed(graph.nodes):             # backward: a producer is never later
        for tensor in node.outputs:
            for c in graph.consumers.get(tensor, ()):
                high[node.index] = min(high[node.index], high[c])
    bad = np.nonzero(low > high)[0]
    if len(bad):
        node = graph.nodes[int(bad[0])]
        raise WpkError(f"impossible pins: node {node.name} would have to run on "
                       f"{tiers[int(low[bad[0]])].name} or later and on "
                       f"{tiers[int(high[bad[0]])].name} or earlier")


def _evaluate_single_tiers(problem: search.Problem, tiers: Tiers
                           ) -> dict[str, search.Evaluation]:
    return {tier.name: search.evaluate(problem, np.full(problem.n_nodes, i, dtype=int))
            for i, tier in enumerate(tiers)}


def partition(model: str | Path | Graph, tiers: Sequence[str] | Tiers | None = None, *,
              tiers_file: str | Path | None = None, links: Sequence[str] = (),
              codecs: Sequence[str] = (),
              objective: str = "latency", max_latency_ms: float | None = None,
              privacy: str = "raw-input-on-device", deliver_to: str | None = None,
              pins: Mapping[str, str] | None = None, max_batch: int = 1,
              input_shapes: Mapping[str, Sequence[int]] | None = None,
              measured: Mapping[str, Sequence[TierCosts]] | None = None,
              efficiency: Efficiency | None = None, use_calibration: bool = True,
              out_dir: str | Path | None = None, verify: bool = True, top: int = 0,
              with_front: bool = False, force: bool = False,
              other_inputs: Sequence[str | Path] = (), max_leakage: str | None = None,
              calibration_data: str | Path | None = None,
              leakage_samples: int | None = None,
              leakage: LeakageReport | None = None) -> PartitionResult:
    """Choose the cuts, write the slices and plan.json to `out_dir` (if given), return all.

    The keyword form of `execute(PartitionRequest(...))`: each keyword is the request field
    of that name (see wpk.partitioner.request).
    """
    return execute(PartitionRequest(
        model=model, input_shapes=input_shapes, tiers=tiers, tiers_file=tiers_file,
        links=links, codecs=codecs, objective=objective, max_latency_ms=max_latency_ms,
        privacy=privacy, deliver_to=deliver_to, pins=dict(pins or {}), max_batch=max_batch,
        measured=measured,
        efficiency=efficiency, use_calibration=use_calibration, out_dir=out_dir, verify=verify,
        force=force, other_inputs=other_inputs, top=top, with_front=with_front,
        max_leakage=max_leakage, calibration_data=calibration_data,
        leakage_samples=leakage_samples, leakage=leakage))


def execute(request: PartitionRequest) -> PartitionResult:
    """Carry out `request`: the search, the plan, and (with `out_dir`) the files.

    Files already in `out_dir` that the plan would write are an earlier result, replaced only
    with `force`; the model, the tiers file and `other_inputs` (profiles) are never written.
    """
    request.check()
    model = request.model
    graph = model if isinstance(model, Graph) else Graph.load(model, request.input_shapes)
    if not graph.nodes:
        raise WpkError(f"{graph.name}: the model has no nodes")
    tiers = request.tiers if isinstance(request.tiers, Tiers) else load_tiers(
        request.tiers, request.tiers_file, request.links, request.codecs)
    deliver = tiers.index(request.deliver_to) if request.deliver_to else 0
    out_dir = Path(request.out_dir) if request.out_dir is not None else None
    if out_dir is not None:   # before the search: its work is not lost to a refusal
        check_outputs([out_dir / "plan.json"] + [out_dir / f"{name}.onnx" for name in tiers.names],
                      [graph.path, request.tiers_file, *request.other_inputs],
                      force=request.force)
    batch = batch_view(graph, request.max_batch) if request.max_batch > 1 else None
    candidates = _cost_candidates(graph, tiers, request, batch)
    report = leakage_plan.report_for(graph, request)
    private = leakage_plan.private_for(report, request.max_leakage)
    if private:
        leakage_plan.check_bound(lambda p: build_problem(
            graph, tiers, [c[0] for c in candidates],
            privacy=request.keeps_raw_input_on_device,
            deliver_to=deliver, pins=request.pins, private=p), report, request.max_leakage)
    found, shown, fronts = _search(graph, tiers, candidates, deliver, request, batch,
                                   private)
    objective = request.objective
    best = min(found, key=lambda c: c.key(objective))
    ranked = _distinct(sorted([best] + found + shown, key=lambda c: c.key(objective)))
    single = _evaluate_single_tiers(best.problem, tiers)
    # where the codec changes, a tier re-encodes: it stays in the plan even without nodes,
    # so that every plan link carries one codec, as each physical link was priced
    relays = [k + 1 for k in range(len(tiers.links) - 1)
              if tiers.links[k].codec != tiers.links[k + 1].codec]
    pieces = slicing.tier_slices(graph, best.evaluation.tiers, best.evaluation.forward_tensors,
                                 best.problem.deliver_to, relays)
    plan = _make_plan(graph, tiers, pieces, best, objective, request.privacy,
                      request.max_latency_ms, single)
    if batch is not None:
        record_batching(plan, graph, tiers, pieces, best, batch)
    leakage_plan.record(plan, report, request.max_leakage, tiers.names[0])
    result = PartitionResult(graph, tiers, best.problem, best, plan, pieces, objective, single,
                             ranked[:request.top] if request.top else [],
                             search.non_dominated(fronts), batch=batch)
    if request.with_front and report is not None:
        result.leakage_metric = leakage_plan.front_metric(request.max_leakage)
        result.leakage_front = leakage_plan.front(best.problem, report,
                                                  result.leakage_metric)
    if out_dir is not None:
        write_plan(result, out_dir, verify=request.verify)
    return result


def _cost_candidates(graph: Graph, tiers: Tiers, request: PartitionRequest,
                     batch: BatchView | None = None) -> list[list[TierCosts]]:
    """Per tier, the cost columns to choose among: measured machines, else the roofline;
    measured ones must be of the batch planned for, and with `batch` each column gets its
    per-request time at that batch too."""
    measured = request.measured or {}
    unknown = set(measured) - set(tiers.names)
    efficiency = request.efficiency
    if efficiency is None:
        efficiency = calibrate() if request.use_calibration else Efficiency()
    if unknown:
        raise WpkError(f"profile or latency table for unknown tier {sorted(unknown)[0]!r} "
                       f"(tiers: {', '.join(tiers.names)})")
    for column in measured.values():
        for costs in column:
            if len(costs.node_ms) != len(graph.nodes):
                raise WpkError(f"tier {costs.tier}: {len(costs.node_ms)} node times for "
                               f"{len(graph.nodes)} nodes")
    candidates = [pair_measured(measured[tier.name], graph, request.max_batch)
                  if tier.name in measured else [estimated_costs(graph, tier, efficiency)]
                  for tier in tiers.tiers]
    if batch is None:
        return candidates
    return [[with_batching(costs, graph, batch, tier, efficiency) for costs in column]
            for tier, column in zip(tiers.tiers, candidates)]


def _search(graph: Graph, tiers: Tiers, candidates: list[list[TierCosts]], deliver: int,
            request: PartitionRequest, batch: BatchView | None = None,
            private: frozenset[str] = frozenset()
            ) -> tuple[list[Configuration], list[Configuration], list[search.Evaluation]]:
    """The search's answer for each choice of machines; with --top / --pareto also more
    cuts to show (never chosen, so that what is printed does not change the plan)."""
    found: list[Configuration] = []
    shown: list[Configuration] = []
    fronts: list[search.Evaluation] = []
    bound = request.max_latency_ms
    fastest_ms = []             # of the machine choices that cannot meet the bound
    for machines in itertools.product(*candidates):
        problem = build_problem(graph, tiers, machines,
                                privacy=request.keeps_raw_input_on_device,
                                deliver_to=deliver, pins=request.pins, batch=batch,
                                private=private)
        try:
            tiers_found = search.solve(problem, request.objective, bound)
        except WpkError:
            if bound is None:
                raise
            fastest_ms.append(search.evaluate(problem, search.min_latency(problem)).latency_ms)
            continue            # another machine may meet it
        found.append(Configuration(machines, problem, search.evaluate(problem, tiers_found)))
        if request.ranks_alternatives:
            front = search.pareto(problem)
            if request.with_front:
                fronts.extend(front)
            others = front + [search.evaluate(problem, t)
                              for t in search.alternatives(problem, tiers_found)] \
                if request.top > 1 else front
            shown.extend(Configuration(machines, problem, e) for e in others
                         if bound is None or e.latency_ms <= bound)
    if not found:
        where = " on any choice of machines" if len(fastest_ms) > 1 else ""
        raise WpkError(f"impossible constraint: the fastest plan takes {min(fastest_ms):.2f} ms"
                       f"{where} > --max-latency-ms {bound:g}")
    return found, shown, fronts


def _distinct(configurations: list[Configuration]) -> list[Configuration]:
    seen, out = set(), []
    for c in configurations:
        key = (tuple(m.machine or m.tier for m in c.machines), tuple(c.evaluation.tiers))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _make_plan(graph: Graph, tiers: Tiers, pieces: Sequence[slicing.TierSlice],
               best: Configuration, objective: str, privacy: str,
               max_latency_ms: float | None, single: dict[str, search.Evaluation]) -> Plan:
    e, problem = best.evaluation, best.problem
    tier_plans = []
    for piece in pieces:
        spec = tiers[piece.tier]
        machine = best.machines[piece.tier]
        tier_plans.append(TierPlan(
            name=spec.name, slice=None, nodes=[graph.nodes[v].name for v in piece.nodes],
            inputs=piece.inputs, outputs=piece.outputs, slice_inputs=piece.slice_inputs,
            slice_outputs=piece.slice_outputs, forward=piece.forward, results=piece.results,
            passthrough=piece.passthrough,
            predicted_compute_ms=round(float(e.compute_ms[piece.tier]), 6),
            hardware=spec.to_json(), cost_source=machine.source, machine=machine.machine,
            profile=machine.profile, address=spec.address))
    link_plans = []
    for a, b in zip(pieces, pieces[1:]):
        hops = range(a.tier, b.tier)                       # physical links a -> b
        first, last = tiers.links[a.tier], tiers.links[b.tier - 1]
        link_plans.append(LinkPlan(
            src=first.src, dst=last.dst,
            bandwidth_mbps=min(tiers.links[k].bandwidth_mbps for k in hops),
            rtt_ms=sum(tiers.links[k].rtt_ms for k in hops),
            tensors=list(e.forward_tensors[a.tier]), bytes=int(e.forward_bytes[a.tier]),
            return_tensors=list(e.return_tensors[b.tier - 1]),
            return_bytes=int(e.return_bytes[b.tier - 1]),
            predicted_transfer_ms=round(float(sum(e.transfer_ms[k] for k in hops)), 6),
            via=[tiers[k].name for k in range(a.tier + 1, b.tier)], codec=first.codec))
    crossing = {t for p in pieces for t in p.inputs + p.outputs} | set(graph.inputs) \
        | set(graph.outputs)
    raw_bytes = sum(graph.tensor_bytes(name) for name in graph.inputs)
    feasible_single = {name: ev for name, ev in single.items()
                       if search.feasible(problem, ev.tiers)}
    best_single = min(feasible_single, key=lambda k: feasible_single[k].latency_ms) \
        if feasible_single else None
    stages = [t.name for t in tiers.tiers] + [l.name for l in tiers.links]
    predicted = {
        "latency_ms": round(e.latency_ms, 6),
        "compute_ms": round(float(e.compute_ms.sum()), 6),
        "transfer_ms": round(float(e.transfer_ms.sum()), 6),
        "bottleneck_ms": round(e.bottleneck_ms, 6),
        "bottleneck_stage": stages[int(np.argmax(e.stages_ms))],
        "throughput_rps": round(1000.0 / e.bottleneck_ms, 3) if e.bottleneck_ms > 0 else None,
        "bytes_beyond_edge": int(e.bytes_beyond_edge),
        "raw_input_bytes": int(raw_bytes),
        "single_tier_latency_ms": {k: round(v.latency_ms, 6) for k, v in single.items()},
        "best_single_tier": best_single,
        "tiers_used": [p.name for p in tier_plans],
    }
    return Plan(
        model=SourceModel(graph.name, str(graph.path.resolve()) if graph.path else None,
                          graph.sha256, tuple(graph.tensor_spec(n) for n in graph.inputs),
                          tuple(graph.tensor_spec(n) for n in graph.outputs)),
        objective=Objective(objective, privacy, tiers[problem.deliver_to].name, max_latency_ms),
        tiers=tier_plans, links=link_plans, predicted=predicted,
        tensors={name: graph.tensor_spec(name) for name in sorted(crossing)})


def record_batching(plan: Plan, graph: Graph, tiers: Tiers,
                    pieces: Sequence[slicing.TierSlice], best: Configuration,
                    batch: BatchView) -> None:
    """With `max_batch`: the batch each tier assumes (plan version 2, so that wpk-deploy
    starts those tiers with --max-batch), and the prediction with and without batching."""
    e, problem = best.evaluation, best.problem
    plan.version = BATCHING_VERSION
    plan.objective = dataclasses.replace(plan.objective, max_batch=batch.max_batch)
    per_tier = {}
    for tier_plan, piece in zip(plan.tiers, pieces):
        tier_plan.batch = int(e.tier_batch[piece.tier])
        stage = float(e.stage_compute_ms[piece.tier])
        per_tier[tier_plan.name] = {
            "batch": tier_plan.batch, "stage_ms": round(stage, 6),
            "throughput_rps": round(1000.0 / stage, 3) if stage > 0 else None,
            "why_batch_1": None if tier_plan.batch > 1 else
            why_unbatched(graph, problem, e.tiers, piece.tier, batch)}
    alone = dataclasses.replace(problem, max_batch=1)
    stages = [t.name for t in tiers.tiers] + [link.name for link in tiers.links]
    plan.predicted["batching"] = {
        "max_batch": batch.max_batch, "tiers": per_tier,
        "unbatched_same_cuts": _rate(search.evaluate(alone, e.tiers), stages),
        "unbatched_best": _rate(search.evaluate(alone, search.solve(alone, "throughput")),
                                stages)}


def _rate(evaluation: search.Evaluation, stages: Sequence[str]) -> dict:
    """A plan's throughput as the prediction states it."""
    ms = evaluation.bottleneck_ms
    return {"bottleneck_ms": round(ms, 6),
            "throughput_rps": round(1000.0 / ms, 3) if ms > 0 else None,
            "bottleneck_stage": stages[int(np.argmax(evaluation.stages_ms))]}


def why_unbatched(graph: Graph, problem: search.Problem, tiers: np.ndarray, tier: int,
                  batch: BatchView) -> str:
    """Why tier `tier` runs lone requests under `tiers`, in a few words."""
    on_tier = np.nonzero(tiers == tier)[0]
    if not len(on_tier):
        return "no nodes: it only hands tensors on"
    if batch.reason:
        return batch.reason
    stuck = [v for v in on_tier if not problem.batchable[v]]
    if stuck:
        node = graph.nodes[int(stuck[0])]
        return f"node {node.name} ({node.op_type}) cannot run in a batch"
    for tensor in problem.tensors:
        if tensor.carries_batch:
            continue
        made_here = tensor.producer >= 0 and tiers[tensor.producer] == tier
        read_here = any(tiers[c] == tier for c in tensor.consumers)
        if made_here != read_here or (made_here and tensor.is_output) or \
                (read_here and tensor.producer < 0):
            return f"tensor {tensor.name} has no batch dimension and crosses to or from it"
    return "its per-request time is no better in a batch"


def write_plan(result: PartitionResult, out_dir: Path, verify: bool = True) -> Path:
    """Write slices + plan.json; verification runs first, so a failed check writes nothing."""
    graph, plan, pieces = result.graph, result.plan, result.pieces
    models = [slicing.slice_model(graph, p, result.tiers[p.tier].name)
              if p.slice_outputs else None for p in pieces]
    if verify:
        plan.verification = slicing.verify(graph, models, pieces)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WpkError(f"{out_dir}: cannot create the output directory ({error.strerror})") \
            from None
    try:
        files = slicing.save_slices(out_dir, models, [t.name for t in plan.tiers])
        for tier, filename in zip(plan.tiers, files):
            tier.slice = filename
        path = plan.save(out_dir)
    except OSError as error:
        raise WpkError(f"{out_dir}: cannot write the plan "
                       f"({error.strerror or error}: {error.filename})") from None
    result.out_dir = out_dir
    return path
