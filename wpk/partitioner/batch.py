"""The model at a batch of N requests, for planning with dynamic batching (`--max-batch N`).

A tier that batches runs its slice once on N requests' rows stacked along the first axis
(`wpk-serve --max-batch`). To price that, the partitioner needs every tensor's shape at
batch N, which nodes can run on stacked rows, and each node's FLOPs and bytes at batch N.

The model's inputs are set to batch N (their first dimension must be 1) and ONNX's shape
inference runs again on the graph the slices are cut from (shape arithmetic already folded
at batch 1, as in the slices); what it leaves open comes from one ONNX Runtime run at batch
N, when the model runs at all. Each tensor then:

- carries the batch: its shape is [1, ...] at batch 1 and [N, ...] at batch N;
- is fixed: it depends on weights and constants only, the same at any batch;
- or is mixed: anything else (a Reshape that wrote the batch size 1 into its shape, a
  reduction over the batch axis, a shape nobody could infer).

A node can batch when what it reads carries the batch or is fixed, and what it makes carries
the batch (or, reading only fixed tensors, is fixed). Control flow (If, Loop, Scan) never
batches: its bodies may hold the batch size. A node that mixes rows without changing shapes
(a Softmax over axis 0) is not seen here; `wpk-serve --max-batch` proves on start that a
slice's batch gives what single requests give, and refuses it otherwise.

FLOPs and bytes at batch N scale with N for activations; weights are read once per batch,
which is where batching gains on a memory-bound layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import shape_inference

from wpk.errors import WpkError
from wpk.graph import Graph, NodeInfo, TensorInfo, fix_input_shapes, node_flops
from wpk.partitioner.costs import Efficiency, TierCosts, roofline_ms
from wpk.shapes import measure_shapes, static_shape
from wpk.tiers import TierSpec

CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
BATCH, FIXED, MIXED = "batch", "fixed", "mixed"


@dataclass(frozen=True)
class BatchView:
    """What a batch of `max_batch` requests means for each node and tensor of a graph."""

    max_batch: int
    batchable: np.ndarray            # [n_nodes] bool: may run on stacked rows
    carries_batch: frozenset[str]    # tensors with the batch dimension
    nodes: tuple[NodeInfo, ...]      # FLOPs and bytes at max_batch (batch 1 where it cannot)
    reason: str | None = None        # why no node can batch, when it is the whole model

    @property
    def first_unbatchable(self) -> str | None:
        """The first node (in topological order) that cannot run in a batch."""
        stuck = np.nonzero(~self.batchable)[0]
        return self.nodes[int(stuck[0])].name if len(stuck) else None


def _nothing_batches(graph: Graph, max_batch: int, reason: str) -> BatchView:
    return BatchView(max_batch, np.zeros(len(graph.nodes), dtype=bool), frozenset(),
                     tuple(graph.nodes), reason)


def batch_view(graph: Graph, max_batch: int) -> BatchView:
    """Which nodes of `graph` can run batches of `max_batch`, and what each costs there."""
    for name in graph.inputs:
        shape = graph.tensors[name].shape
        if not shape or shape[0] != 1:
            return _nothing_batches(graph, max_batch, f"input {name!r} has no batch dimension "
                                    f"of 1 (shape {list(shape)})")
    try:
        shapes = shapes_at_batch(graph, max_batch)
    except WpkError as error:
        return _nothing_batches(graph, max_batch, str(error))
    states = {name: BATCH for name in graph.inputs}
    states.update({name: FIXED for name in graph.initializers})
    protos = {node.name: node for node in graph.model.graph.node}
    batchable = np.zeros(len(graph.nodes), dtype=bool)
    nodes = []
    for node in graph.nodes:
        outputs = _output_states(node, states, shapes, graph, max_batch)
        states.update(outputs)
        ok = node.op_type not in CONTROL_FLOW and MIXED not in outputs.values()
        batchable[node.index] = ok
        nodes.append(_at_batch(node, protos[node.name], graph, shapes) if ok else node)
    carrying = frozenset(name for name, state in states.items() if state == BATCH)
    return BatchView(max_batch, batchable, carrying, tuple(nodes))


def _output_states(node: NodeInfo, states: dict[str, str], shapes: dict[str, tuple],
                   graph: Graph, max_batch: int) -> dict[str, str]:
    """The state of each tensor `node` makes, from what it reads and the shapes at batch N."""
    reads = [states.get(name, MIXED) for name in node.inputs]
    if MIXED in reads or node.op_type in CONTROL_FLOW:
        return {name: MIXED for name in node.outputs}
    out = {}
    for name in node.outputs:
        alone, batched = graph.tensors[name].shape, shapes.get(name)
        if BATCH not in reads:
            out[name] = FIXED if batched == alone else MIXED
        else:
            carries = alone[:1] == (1,) and batched == (max_batch, *alone[1:])
            out[name] = BATCH if carries else MIXED
    return out


def _at_batch(node: NodeInfo, proto: onnx.NodeProto, graph: Graph,
              shapes: dict[str, tuple]) -> NodeInfo:
    """`node` with its FLOPs and bytes at batch N (weights counted once)."""
    tensors = {}
    for name in dict.fromkeys(node.inputs + node.outputs):
        info = graph.tensors[name]
        shape = info.shape if info.is_initializer else shapes.get(name, info.shape)
        tensors[name] = TensorInfo(name, tuple(shape), info.dtype, info.is_initializer)
    return dataclasses.replace(node, flops=node_flops(proto, tensors),
                               bytes_touched=sum(tensors[t].nbytes
                                                 for t in node.inputs + node.outputs))


def shapes_at_batch(graph: Graph, max_batch: int) -> dict[str, tuple[int, ...]]:
    """Static shapes of the graph's tensors with every input at batch `max_batch` (those
    nobody can tell are missing); a WpkError when shape inference itself fails."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    fix_input_shapes(model, {name: (max_batch, *graph.tensors[name].shape[1:])
                             for name in graph.inputs}, graph.name)
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as error:   # onnx's own exception types
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise WpkError(f"shape inference fails at batch {max_batch}: {first}") from None
    values = list(inferred.graph.input) + list(inferred.graph.value_info) + \
        list(inferred.graph.output)
    shapes = {v.name: static_shape(v) for v in values if static_shape(v) is not None}
    missing = [name for node in graph.nodes for name in node.outputs if name not in shapes]
    if missing:
        try:
            shapes.update(measure_shapes(inferred, missing, graph.name))
        except WpkError:
            pass    # the model does not run at this batch: those tensors stay unknown
    return shapes


def with_batching(costs: TierCosts, graph: Graph, view: BatchView, tier: TierSpec,
                  efficiency: Efficiency) -> TierCosts:
    """`costs` with both columns a batched plan needs: a lone request's time per node
    (`node_ms`) and the time per request when the tier runs batches of N (`batched_ms`).

    Estimated costs: the roofline at batch 1 and at batch N (divided by N). Costs measured
    at batch N (a profile taken with `--input-shape NAME=Nx...`): those times divided by N,
    and, unless a profile of the same machine at batch 1 gave them (`pair_measured`), a
    lone request's times scaled from them by the roofline's ratio of batch 1 to batch N on
    this tier's hardware. Costs measured at another batch are refused before this."""
    if costs.batched_ms is not None:        # both measured
        return costs
    n = view.max_batch
    lone_estimate = roofline_ms(graph, tier, efficiency)
    batch_estimate = roofline_ms(graph, tier, efficiency, view.nodes)
    if costs.batch == n:
        lone = costs.node_ms * lone_estimate / np.maximum(batch_estimate, 1e-12)
        source = f"{costs.source} at batch {n}; batch 1 scaled by the roofline"
        return dataclasses.replace(costs, node_ms=lone, batch=1, batched_ms=costs.node_ms / n,
                                   source=source)
    return dataclasses.replace(costs, batched_ms=batch_estimate / n)


def pair_measured(column: Sequence[TierCosts], graph: Graph, max_batch: int
                  ) -> list[TierCosts]:
    """One tier's measured columns for a plan at `max_batch`: each machine (profile device
    name) profiled at batch N, and maybe at batch 1 too; a machine with both is one column
    whose lone-request times are the batch-1 profile's. Anything else is refused in one
    line naming the file."""
    if max_batch == 1:
        for costs in column:
            check_batch(costs, graph, max_batch)
        return list(column)
    machines: dict[str, list[TierCosts]] = {}
    for costs in column:
        machines.setdefault(costs.machine or costs.tier, []).append(costs)
    paired = []
    for name, group in machines.items():
        by_batch: dict[int | None, TierCosts] = {}
        for costs in group:
            if costs.batch in by_batch:
                raise WpkError(f"{_where(costs)}: a second profile of machine {name!r} at "
                               f"batch {costs.batch} for tier {costs.tier}")
            if costs.batch not in (1, max_batch):
                check_batch(costs, graph, max_batch)        # refused
            by_batch[costs.batch] = costs
        if max_batch not in by_batch:
            check_batch(by_batch[1], graph, max_batch)      # refused: batch 1 alone
        at_n, alone = by_batch[max_batch], by_batch.get(1)
        if alone is not None:
            at_n = dataclasses.replace(
                at_n, node_ms=alone.node_ms, batch=1, batched_ms=at_n.node_ms / max_batch,
                source=f"{at_n.source} at batch 1 and {max_batch}",
                profile=dict(at_n.profile or {}, batch_1_file=_where(alone)))
        paired.append(at_n)
    return paired


def _where(costs: TierCosts) -> str:
    return (costs.profile or {}).get("file") or f"tier {costs.tier}'s measured costs"


def check_batch(costs: TierCosts, graph: Graph, max_batch: int) -> None:
    """Measured times must be of the batch the plan assumes: one line naming the file."""
    if costs.batch == max_batch or (costs.batch is None and max_batch == 1):
        return
    where = _where(costs)
    shapes = " ".join(f"--input-shape {name}=" + "x".join(
        map(str, (max_batch, *graph.tensors[name].shape[1:]))) for name in graph.inputs)
    taken = "at an unrecorded batch" if costs.batch is None else f"at batch {costs.batch}"
    planned = f"batches of {max_batch} (--max-batch {max_batch})" if max_batch > 1 \
        else "lone requests (batch 1)"
    raise WpkError(f"{where}: measured {taken}, but the plan is for {planned}: profile at "
                   f"that batch (wpk-profile {shapes})")
