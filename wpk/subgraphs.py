"""What a node reads, subgraphs included.

Control-flow nodes (If, Loop, Scan) carry subgraphs that may read tensors of the graph around
them without naming them among the node's inputs. Every tool that asks which tensors a node
needs (the topological order, the cut search, slicing, the optimizer's passes) asks here.
"""
from __future__ import annotations

import onnx


def _subgraph_reads(body: onnx.GraphProto) -> set[str]:
    """Names a subgraph (an If branch, a Loop body) reads from the scopes around it."""
    defined = ({v.name for v in body.input} | {i.name for i in body.initializer}
               | {i.values.name for i in body.sparse_initializer}
               | {o for n in body.node for o in n.output})
    reads = {i for n in body.node for i in node_reads(n)}
    return reads - defined


def node_reads(node: onnx.NodeProto) -> tuple[str, ...]:
    """Every tensor a node reads: its inputs, and the outer-scope tensors its subgraphs use
    (a Loop body reading a weight of the main graph must run where that weight is)."""
    implicit: set[str] = set()
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            implicit |= _subgraph_reads(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            for body in attribute.graphs:
                implicit |= _subgraph_reads(body)
    explicit = [name for name in node.input if name]
    return tuple(dict.fromkeys(explicit + sorted(implicit - set(explicit))))
