"""One naming function for nodes, shared by Graph, profiles, plans and slices.

ONNX allows unnamed (and duplicate-named) nodes. Everything in wpk refers to nodes by name,
so every tool must derive the same names from the same file: a node keeps its own name when
it has a unique one, otherwise it gets `<op_type>_<index>` where index is its position in the
model's node list (suffixed `_1`, `_2`... if that collides).
"""
from __future__ import annotations

import onnx


def node_names(nodes: list[onnx.NodeProto]) -> list[str]:
    """Stable, unique names for `nodes`, in their order."""
    counts: dict[str, int] = {}
    for node in nodes:
        if node.name:
            counts[node.name] = counts.get(node.name, 0) + 1
    taken = {name for name, n in counts.items() if n == 1}
    names: list[str] = []
    for index, node in enumerate(nodes):
        if node.name and counts[node.name] == 1:
            names.append(node.name)
            continue
        base = f"{node.op_type}_{index}"
        name, suffix = base, 0
        while name in taken:
            suffix += 1
            name = f"{base}_{suffix}"
        taken.add(name)
        names.append(name)
    return names


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node of the main graph its stable name (in place); returns `model`."""
    for node, name in zip(model.graph.node, node_names(list(model.graph.node))):
        node.name = name
    return model
