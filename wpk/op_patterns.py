"""Multi-node patterns ONNX Runtime fuses in transformer exports (level-2 fusions on CPU).

- GeluFusion: x / sqrt(2) -> Erf -> + 1 -> * x -> * 0.5 (in either order of the two Muls)
  becomes one Gelu kernel: priced as `act-Gelu` on x, the other nodes free.
- MatmulTransposeFusion: a Transpose of the last two axes read only by a MatMul is folded
  into it (FusedMatMul).
- SkipLayerNormFusion: Add (the residual) -> LayerNormalization becomes one
  SkipLayerNormalization: the Add is free, the LayerNormalization reads one more tensor.
"""
from __future__ import annotations

from wpk.graph import Graph, NodeInfo
from wpk.op_features import Fusions, NodeFeatures, fusions


def _sole_consumer(graph: Graph, tensor: str) -> NodeInfo | None:
    readers = graph.consumers.get(tensor, [])
    if len(readers) != 1 or tensor in graph.outputs:
        return None
    return graph.nodes[readers[0]]


def _other_input(node: NodeInfo, tensor: str) -> str | None:
    others = [t for t in node.inputs if t != tensor]
    return others[0] if len(others) == 1 else None


def _gelu(found: Fusions, erf: NodeInfo) -> None:
    graph, constant = found.graph, found.constant
    scaled = erf.inputs[0]
    divide = graph.nodes[graph.producer[scaled]] if scaled in graph.producer else None
    if divide is None or divide.op_type not in ("Div", "Mul") or \
            _sole_consumer(graph, scaled) is None:
        return
    x = next((t for t in divide.inputs if t not in constant), None)
    if x is None or _other_input(divide, x) not in constant:
        return
    chain, tensor, seen_x = [], erf.outputs[0], False
    while len(chain) < 3:
        node = _sole_consumer(graph, tensor)
        if node is None or node.op_type not in ("Add", "Mul"):
            break
        other = _other_input(node, tensor)
        if other == x and node.op_type == "Mul":
            seen_x = True
        elif other not in constant:
            break
        chain.append(node)
        tensor = node.outputs[0]
    if not seen_x or len(chain) < 3 or chain[0].op_type != "Add":
        return
    for node in (divide, *chain):
        found.fused[node.index] = "fused into Gelu"
    nbytes = graph.tensor_bytes(x)
    found.replaced[erf.index] = NodeFeatures("act-Gelu", 8.0 * graph.tensors[x].numel,
                                             2.0 * nbytes)


def _transpose_into_matmul(found: Fusions, node: NodeInfo) -> None:
    graph = found.graph
    perm = list(graph.attribute(node, "perm", []))
    rank = len(graph.tensors[node.inputs[0]].shape)
    reader = _sole_consumer(graph, node.outputs[0])
    if reader is not None and reader.op_type == "MatMul" and len(perm) == rank >= 2 and \
            perm[:-2] == list(range(rank - 2)) and perm[-2:] == [rank - 1, rank - 2]:
        found.fused[node.index] = "fused into MatMul"


def _skip_layer_norm(found: Fusions, norm: NodeInfo) -> None:
    graph = found.graph
    data = norm.inputs[0]
    add = graph.nodes[graph.producer[data]] if data in graph.producer else None
    if add is None or add.op_type != "Add" or add.index in found.fused or \
            any(t in found.constant for t in add.inputs) or len(add.inputs) != 2:
        return
    found.fused[add.index] = "fused into SkipLayerNormalization"
    found.extra_read[norm.index] = graph.tensor_bytes(add.inputs[1])


def all_fusions(graph: Graph) -> Fusions:
    """`op_features.fusions` and the transformer patterns above."""
    found = fusions(graph)
    for node in graph.nodes:
        if node.index in found.fused:
            continue
        if node.op_type == "Erf":
            _gelu(found, node)
        elif node.op_type == "Transpose":
            _transpose_into_matmul(found, node)
        elif node.op_type == "LayerNormalization":
            _skip_layer_norm(found, node)
    return found
