"""Where ONNX Runtime changes tensor layouts on x86: the NCHWc reorders a model will pay for.

On x86 CPUs with AVX2 or AVX-512, ONNX Runtime's NCHWc transformer runs convolutions and
pooling on channel-blocked tensors (blocks of 8 or 16 channels). Operators that can work on
blocked tensors keep them blocked; every other operator that reads one gets a ReorderOutput
first, and a blocked operator reading a plain tensor gets a ReorderInput. In a network of
convolutions that is a few reorders at the edges; around a channel shuffle, an LRN or a
per-channel Mul it is one or two per block. (The residual Add and activation it can fold
into a convolution are folded earlier, by the graph-level fusions.)

`nchwc_effects` replays the transformer's rules (onnxruntime/core/optimizer/
nchwc_transformer.cc) on a `Graph` after the graph-level fusions (`op_features.fusions`):
which nodes pay for reorders (bytes of each reordered tensor).
The latency table says whether its machine uses NCHWc, and with what block size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from wpk.graph import Graph, NodeInfo
from wpk.op_features import Fusions

POOLS = frozenset({"MaxPool", "AveragePool"})
GLOBAL_POOLS = frozenset({"GlobalMaxPool", "GlobalAveragePool"})
FOLLOWERS = frozenset({"Relu", "Sigmoid", "Tanh", "BatchNormalization", "Resize", "Upsample"})


@dataclass
class _Blocked:
    """A tensor held in the blocked layout, of this many (logical) channels."""

    channels: int


@dataclass
class LayoutEffects:
    """Bytes reordered before each node (node index -> tensor sizes)."""

    reorders: dict[int, list[int]] = field(default_factory=dict)


class _Walk:
    def __init__(self, graph: Graph, found: Fusions, block: int):
        self.graph, self.found, self.block = graph, found, block
        self.blocked: dict[str, _Blocked] = {}
        self.reordered_in: set[str] = set()
        self.reordered_out: set[str] = set()
        self.effects = LayoutEffects()

    def _reorder(self, node: NodeInfo, tensor: str, seen: set[str]) -> None:
        if tensor not in seen:
            seen.add(tensor)
            self.effects.reorders.setdefault(node.index, []).append(
                self.graph.tensor_bytes(tensor))

    def _channels(self, tensor: str) -> int | None:
        shape = self.graph.tensors[tensor].shape
        return shape[1] if len(shape) == 4 else None

    def _conv_blocks(self, node: NodeInfo) -> tuple[bool, bool]:
        """(runs blocked, needs its input reordered) for a convolution."""
        if len(node.inputs) < 2 or node.inputs[1] not in self.found.constant:
            return False, False
        weight = self.graph.tensors[node.inputs[1]]
        if len(weight.shape) != 4 or weight.dtype.kind != "f" or weight.dtype.itemsize != 4:
            return False, False
        out_channels, in_per_group = weight.shape[0], weight.shape[1]
        groups = int(self.graph.attribute(node, "group", 1))
        block = self.block
        if groups > 1:
            depthwise = in_per_group == 1 and out_channels == groups
            aligned = in_per_group % block == 0 and out_channels % groups == 0 \
                and (out_channels // groups) % block == 0
            return out_channels % block == 0 and (depthwise or aligned), True
        if in_per_group < block:
            return True, False
        return in_per_group % block == 0, True

    def visit(self, node: NodeInfo) -> None:
        reason = self.found.fused.get(node.index, "")
        data = [t for t in node.inputs if t not in self.found.constant]
        if reason == "constant-folded":
            return
        if reason and data and data[0] in self.blocked:     # fused or removed: same layout
            for out in node.outputs:
                self.blocked[out] = self.blocked[data[0]]
            return
        if not reason and self._blocked_op(node, data):
            return
        for tensor in data:                                  # a plain operator
            if tensor in self.blocked:
                self._reorder(node, tensor, self.reordered_out)

    def _blocked_op(self, node: NodeInfo, data: list[str]) -> bool:
        """Run `node` blocked if the transformer would; False where it stays plain."""
        op = node.op_type
        if op == "Conv":
            blocked, reorder = self._conv_blocks(node)
            if not blocked:
                return False
            channels = self.graph.tensors[node.inputs[1]].shape[0]
            return self._start(node, data, reorder, _Blocked(channels))
        if op in POOLS or (op in GLOBAL_POOLS and data and data[0] in self.blocked):
            channels = self._channels(data[0]) if data else None
            if channels is None or channels % self.block:
                return False
            return self._start(node, data, True, _Blocked(channels))
        if not data or data[0] not in self.blocked:
            return False
        return self._follow(node, data)

    def _start(self, node: NodeInfo, data: list[str], reorder: bool,
               state: _Blocked) -> bool:
        """A blocked operator: its input reordered in (or, for a convolution that reads
        the plain layout, a blocked input reordered out); its output blocked."""
        if reorder and data[0] not in self.blocked:
            self._reorder(node, data[0], self.reordered_in)
        elif not reorder and data[0] in self.blocked:
            self._reorder(node, data[0], self.reordered_out)
        for out in node.outputs[:1]:
            self.blocked[out] = state
        return True

    def _follow(self, node: NodeInfo, data: list[str]) -> bool:
        """Operators that stay blocked when every input already is."""
        op, first = node.op_type, self.blocked[data[0]]
        if op in ("Add", "Sum", "Mul", "Concat") and (
                len(data) < len(node.inputs) or any(t not in self.blocked for t in data)):
            return False        # every input blocked (a constant operand is not)
        if op in ("Resize", "Upsample") and not self._nearest_integer_resize(node):
            return False
        if op in ("Add", "Sum", "Mul"):
            if any(self.blocked[t].channels != first.channels for t in data):
                return False
            self.blocked[node.outputs[0]] = _Blocked(first.channels)
            return True
        if op == "Concat":
            if self.graph.attribute(node, "axis", 1) % 4 != 1 or \
                    any(self.blocked[t].channels % self.block for t in data):
                return False
            total = sum(self.blocked[t].channels for t in data)
            self.blocked[node.outputs[0]] = _Blocked(total)
            return True
        if op == "Transpose" and list(self.graph.attribute(node, "perm", [])) == [0, 2, 3, 1]:
            self._reorder(node, data[0], self.reordered_out)   # becomes a ReorderOutput
            return True
        if op in FOLLOWERS:
            self.blocked[node.outputs[0]] = _Blocked(first.channels)
            return True
        return False

    def _nearest_integer_resize(self, node: NodeInfo) -> bool:
        """The only resizing the transformer blocks: nearest, constant integer scales (and
        for Resize: asymmetric coordinates, floor rounding, scales rather than sizes)."""
        def text(name: str, default: str) -> str:
            value = self.graph.attribute(node, name, default)
            return value.decode() if isinstance(value, bytes) else str(value)

        slots = self.graph.input_slots(node)
        if node.op_type == "Resize":
            if len(slots) != 3 or text("coordinate_transformation_mode", "half_pixel") \
                    != "asymmetric" or text("nearest_mode", "round_prefer_floor") != "floor":
                return False
            scales = slots[2]
        else:
            scales = slots[1] if len(slots) > 1 else ""
        return text("mode", "nearest") == "nearest" and scales in self.found.constant

    def finish(self) -> LayoutEffects:
        for output in self.graph.outputs:
            if output in self.blocked and output in self.graph.producer:
                producer = self.graph.nodes[self.graph.producer[output]]
                self._reorder(producer, output, self.reordered_out)
        return self.effects


def nchwc_effects(graph: Graph, found: Fusions, block: int) -> LayoutEffects:
    """Reorders and fusions of ONNX Runtime's NCHWc transformer with `block` channels per
    block (16 with AVX-512, 8 with AVX2; 0 or 1: not used, no effects)."""
    if block <= 1:
        return LayoutEffects()
    walk = _Walk(graph, found, block)
    for node in graph.nodes:
        walk.visit(node)
    return walk.finish()
