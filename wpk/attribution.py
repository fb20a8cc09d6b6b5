"""Map ONNX Runtime's measured kernels back to the model's own nodes.

ONNX Runtime profiles the *optimized* graph: it fuses Conv+BatchNorm+Relu(+Add) into one
kernel, rewrites convolutions to the blocked NCHWc layout (nodes named `<tensor>_nchwc`,
tensors `reorder_token_N`), inserts ReorderInput/ReorderOutput, Transpose and Memcpy nodes,
and folds or removes others. We save the optimized graph (`optimized_model_filepath`) and
attribute every kernel to the original nodes it computes, in four steps:

1. **Tensor aliases.** Each tensor of the optimized graph is matched to the original tensor
   it holds (in whatever layout): the same name; else, read backwards from a consumer whose
   original node is known (its data input is that node's data input); else, through a
   layout-only node (Reorder*, Transpose inserted by ORT, Memcpy*) to that node's input;
   else from the producer's original node (the output it is named after).
   A kernel's original node is known from ORT's naming: the same name, `fused <name>` or
   `fused <name>/<Fusion>` (fusions), or `<output tensor>_nchwc` (NCHWc rewrite).
2. **Coverage.** Walking the optimized graph in order, a kernel covers every original node
   that its outputs depend on and that no earlier kernel covered: a fused
   Conv+BatchNorm+Relu kernel covers all three; a node folded into a constant or removed
   (Identity, Dropout) is covered by the first kernel that needs its result.
3. **Split.** A kernel's time is split over the nodes it covers in proportion to their
   roofline estimate (FLOPs at 100 GFLOP/s plus bytes touched at 20 GB/s).
4. **Unattributable kernels** (layout reorders, copies: they produce nothing new) give their
   time to the covering kernels they feed (or, at the graph's end, to those feeding them),
   in proportion to those kernels' measured times. Kernels absent from the optimized graph
   (e.g. compiled execution-provider partitions, when the optimized model cannot be saved)
   are split over all nodes by the estimate.

Nodes never covered (dead code ORT removed) get 0 ms. Every kernel's time lands on some
node, so the node times add up to the measured kernel time.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx

from wpk.graph import Graph, _topological_order

# Nodes ORT inserts that only move or re-layout a tensor.
LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput", "MemcpyToHost", "MemcpyFromHost",
                        "Transpose", "Identity"})
PEAK_FLOPS = 100e9     # weights for splitting a fused kernel's time: a balanced machine
PEAK_BYTES_S = 20e9


def estimate_weights(graph: Graph) -> np.ndarray:
    """Roofline-style relative cost of each node (seconds at 100 GFLOP/s + 20 GB/s)."""
    return np.array([n.flops / PEAK_FLOPS + n.bytes_touched / PEAK_BYTES_S + 1e-9
                     for n in graph.nodes])


@dataclass
class KernelMap:
    """For each kernel name, the share of its time that each model node (index) gets."""

    n_nodes: int
    shares: dict[str, dict[int, float]]
    fallback: dict[int, float]
    stats: dict[str, int] = field(default_factory=dict)

    def attribute(self, kernel_ms: Mapping[str, float]) -> np.ndarray:
        """Node times (aligned with graph.nodes) from one run's time per kernel."""
        times = np.zeros(self.n_nodes)
        for kernel, ms in kernel_ms.items():
            for index, share in self.shares.get(kernel, self.fallback).items():
                times[index] += ms * share
        return times


def _normalized(weights: Mapping[int, float]) -> dict[int, float]:
    total = sum(weights.values())
    if total <= 0:
        return {i: 1.0 / len(weights) for i in weights}
    return {i: w / total for i, w in weights.items()}


GENERATED_DOMAIN = "ai.wpk"    # wpk-optimize's custom operators


def ort_name(node: onnx.NodeProto) -> str:
    """The name of the ONNX Runtime node `node` stands for: a wpk custom operator is named
    '<first node it replaces>[+<more>]:<op type>'."""
    if node.domain == GENERATED_DOMAIN:
        return node.name.rsplit(":", 1)[0].split("+")[0]
    return node.name


class _Mapper:
    def __init__(self, graph: Graph, optimized: onnx.ModelProto):
        self.graph = graph
        self.original = {n.name: n for n in graph.model.graph.node}
        initializers = {i.name for i in optimized.graph.initializer}
        self.opt_nodes = _topological_order(
            list(optimized.graph.node),
            {v.name for v in optimized.graph.input} | initializers)
        self.alias: dict[str, str | None] = {}

    def identity(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """The original node an optimized node stands for, from ORT's naming."""
        name = ort_name(node).split("/")[0]  # 'fused MatMul_0/MatMulAddFusion'
        if name.startswith("fused ") and name[6:] in self.original:
            return self.original[name[6:]]
        if name in self.original:
            return self.original[name]
        if name.endswith("_nchwc") and name[:-6] in self.graph.producer:
            return self.original[self.graph.nodes[self.graph.producer[name[:-6]]].name]
        return None

    @staticmethod
    def compatible(node: onnx.NodeProto, original: onnx.NodeProto) -> bool:
        return node.op_type in (original.op_type, "Fused" + original.op_type)

    def build_aliases(self) -> None:
        self._alias_known_tensors()
        self._alias_backwards()
        self._alias_forwards()

    def _alias_known_tensors(self) -> None:
        """Tensors of the optimized graph that kept their original names."""
        tensors = self.graph.tensors
        for node in self.opt_nodes:
            for name in list(node.input) + list(node.output):
                if name and name in tensors:
                    self.alias[name] = name

    def _alias_backwards(self) -> None:
        """A consumer standing for a known original node names its data input."""
        for node in self.opt_nodes:
            original = self.identity(node)
            if original is None or not self.compatible(node, original):
                continue
            same_arity = len(node.input) == len(original.input)
            for position, name in enumerate(node.input):
                if position > 0 and not same_arity:
                    break
                if not name or name in self.alias or position >= len(original.input):
                    continue
                source = original.input[position]
                if source and source not in self.graph.initializers:
                    self.alias[name] = source

    def _alias_forwards(self) -> None:
        """Through layout-only nodes, else from the producer's original node."""
        for node in self.opt_nodes:
            original = self.identity(node)
            for position, name in enumerate(node.output):
                if not name or name in self.alias:
                    continue
                if node.op_type in LAYOUT_OPS and node.input:
                    self.alias[name] = self.alias.get(node.input[0])
                elif original is not None and position < len(original.output):
                    name = ort_name(node)
                    named_after = name[:-6] if name.endswith("_nchwc") else None
                    self.alias[name] = named_after if position == 0 and named_after \
                        else original.output[position] or None

    def coverage(self) -> list[set[int]]:
        """For each optimized node, the original nodes it covers (see module docstring)."""
        graph, done = self.graph, set()
        covered_by: list[set[int]] = []
        for node in self.opt_nodes:
            stack = [graph.producer[a] for a in
                     (self.alias.get(t) for t in node.output if t) if a in graph.producer]
            covered: set[int] = set()
            while stack:
                index = stack.pop()
                if index in done or index in covered:
                    continue
                covered.add(index)
                stack.extend(graph.producer[t] for t in graph.nodes[index].inputs
                             if t in graph.producer)
            done |= covered
            covered_by.append(covered)
        return covered_by


def build_kernel_map(graph: Graph, optimized: onnx.ModelProto | None,
                     kernel_ms: Mapping[str, float]) -> KernelMap:
    """How to split each kernel's time over `graph`'s nodes.

    `optimized` is the graph ONNX Runtime ran (None when it could not be saved);
    `kernel_ms` the median time of each kernel, used to split unattributable kernels.
    """
    weights = estimate_weights(graph)
    fallback = _normalized({i: float(w) for i, w in enumerate(weights)})
    if optimized is None:
        return KernelMap(len(graph.nodes), {}, fallback, {"unmapped": len(kernel_ms)})
    mapper = _Mapper(graph, optimized)
    mapper.build_aliases()
    covered_by = mapper.coverage()
    nodes = mapper.opt_nodes
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for t in node.input:
            consumers.setdefault(t, []).append(k)
        for t in node.output:
            producer[t] = k
    node_shares: list[dict[int, float] | None] = [
        _normalized({i: float(weights[i]) for i in covered}) if covered else None
        for covered in covered_by]

    def neighbours(start: int, forward: bool) -> list[int]:
        found, seen, queue = [], {start}, deque([start])
        while queue:
            k = queue.popleft()
            tensors = nodes[k].output if forward else nodes[k].input
            nexts = [c for t in tensors if t for c in consumers.get(t, [])] if forward \
                else [producer[t] for t in tensors if t in producer]
            for j in nexts:
                if j in seen:
                    continue
                seen.add(j)
                if node_shares[j] is not None:
                    found.append(j)
                else:
                    queue.append(j)
        return found

    stats = {"kernels": len(nodes), "covering": sum(s is not None for s in node_shares),
             "redistributed": 0, "unmapped": 0}
    resolved: list[dict[int, float]] = []
    for k, shares in enumerate(node_shares):
        if shares is not None:
            resolved.append(shares)
            continue
        stats["redistributed"] += 1
        targets = neighbours(k, forward=True) or neighbours(k, forward=False)
        if not targets:
            resolved.append(fallback)
            continue
        times = _normalized({j: kernel_ms.get(nodes[j].name, 0.0) for j in targets})
        mixed: dict[int, float] = {}
        for j, weight in times.items():
            for index, share in node_shares[j].items():  # type: ignore[union-attr]
                mixed[index] = mixed.get(index, 0.0) + weight * share
        resolved.append(mixed)

    by_name: dict[str, list[dict[int, float]]] = {}
    for node, shares in zip(nodes, resolved):
        by_name.setdefault(node.name, []).append(shares)
    kernel_shares: dict[str, dict[int, float]] = {}
    for name, all_shares in by_name.items():  # duplicate kernel names: average
        merged: dict[int, float] = {}
        for shares in all_shares:
            for index, share in shares.items():
                merged[index] = merged.get(index, 0.0) + share / len(all_shares)
        kernel_shares[name] = merged
    stats["unmapped"] = sum(1 for name in kernel_ms if name not in kernel_shares)
    return KernelMap(len(graph.nodes), kernel_shares, fallback, stats)
