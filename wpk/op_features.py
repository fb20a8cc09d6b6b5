"""What a latency table knows a node by: its operator family, FLOPs and bytes.

One function, `node_features`, describes both the single-operator models that
`wpk-profile --ops` times and every node of a model whose times are predicted, so that the
table and the predictor always agree on what a family is. A family groups operators whose
time follows one curve in FLOPs and bytes: `conv-k3` (dense convolutions with a 3x3
kernel), `depthwise-k5`, `grouped-k3` (narrow groups), `transposed-k2` (ConvTranspose),
`gemm` (a matrix product with constant weights), `matmul` (two activations, as
attention's), `act-Sigmoid`, `binary`, `copy-Concat` (data movement), `view` (reshapes),
...

`fusions` finds the nodes ONNX Runtime folds away or fuses into the kernel of another
(BatchNormalization and activations after a convolution, a bias Add after a MatMul,
Identity, constant subgraphs): a model's time is the time of the kernels ORT runs, not of
its nodes. Transformer patterns are in `wpk.op_patterns`, NCHWc layouts in `wpk.op_layout`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from wpk.graph import Graph, NodeInfo, conv_weight_index

CONV_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"})
MATRIX_OPS = frozenset({"Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"})
CONV_KERNELS = (1, 3, 5, 7)
TRANSPOSED_KERNELS = (2, 3, 4)
# Groups of at least this many input channels run as dense convolutions do (AlexNet's two
# halves, ShuffleNet's 1x1 groups); narrower ones (ResNeXt's 4 to 32) are `grouped`.
NARROW_GROUP = 48
DEPTHWISE_KERNELS = (3, 5, 7)

# Unary operators timed in the grid, and what an operator not in a table counts as.
ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
               "Erf", "Gelu", "Exp", "Sqrt")
ACTIVATION_STAND_INS = {
    "Abs": "Relu", "Neg": "Relu", "Floor": "Relu", "Ceil": "Relu", "Round": "Relu",
    "Sign": "Relu", "Not": "Relu", "Cast": "Relu", "PRelu": "LeakyRelu", "Elu": "Sigmoid",
    "Selu": "Sigmoid", "Celu": "Sigmoid", "Softplus": "Sigmoid", "Softsign": "Sigmoid",
    "Mish": "Tanh", "Log": "Exp", "Reciprocal": "Sqrt", "ThresholdedRelu": "Relu",
    "IsNaN": "Relu", "IsInf": "Relu", "QuickGelu": "Gelu", "FastGelu": "Gelu", "BiasGelu": "Gelu",
}
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum",
                        "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Where",
                        "And", "Or", "Xor", "Mod", "BitShift"})
COPY_OPS = frozenset({"Concat", "Transpose", "Slice", "Split", "Pad", "Gather",
                      "GatherElements", "GatherND", "Resize", "Upsample", "Expand", "Tile",
                      "DepthToSpace", "SpaceToDepth", "ScatterND", "ScatterElements",
                      "ReverseSequence", "Compress", "Trilu", "CumSum", "OneHot", "Range",
                      "ArgMax", "ArgMin", "TopK", "NonZero"})
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Size"})
REMOVED_OPS = frozenset({"Identity", "Dropout", "Constant"})
SIMPLE_FAMILIES = {
    "MaxPool": "maxpool", "AveragePool": "avgpool", "LpPool": "avgpool",
    "GlobalAveragePool": "reduce", "GlobalMaxPool": "reduce", "GlobalLpPool": "reduce",
    "Softmax": "softmax", "LogSoftmax": "softmax",
    "LayerNormalization": "layernorm", "SimplifiedLayerNormalization": "layernorm",
    "SkipLayerNormalization": "layernorm", "InstanceNormalization": "layernorm",
    "GroupNormalization": "layernorm", "BatchNormalization": "batchnorm", "LRN": "lrn",
}
# Families timed against FLOPs and bytes; the others against bytes alone.
COMPUTE_FAMILIES = ("conv", "depthwise", "grouped", "transposed", "gemm", "matmul")


@dataclass(frozen=True)
class NodeFeatures:
    """A node as a latency table sees it."""

    family: str
    flops: float
    bytes: float

    @property
    def is_compute(self) -> bool:
        return self.family.split("-")[0] in COMPUTE_FAMILIES


def _nearest(value: int, choices: tuple[int, ...]) -> int:
    return min(choices, key=lambda c: (abs(c - value), c))


def _conv_family(node: NodeInfo, graph: Graph) -> str:
    weight = graph.tensors[node.inputs[conv_weight_index(node.op_type)]].shape
    data = graph.tensors[node.inputs[0]].shape
    kernel = max(weight[2:], default=1)
    in_channels = data[1] if len(data) > 1 else 1
    groups = in_channels // max(weight[1], 1) if len(weight) > 1 else 1
    if node.op_type != "ConvTranspose" and groups > 1 and weight[1] == 1:
        return f"depthwise-k{_nearest(kernel, DEPTHWISE_KERNELS)}"
    if node.op_type != "ConvTranspose" and groups > 1 and weight[1] < NARROW_GROUP:
        return f"grouped-k{_nearest(kernel, CONV_KERNELS)}"
    if node.op_type == "ConvTranspose":
        return f"transposed-k{_nearest(kernel, TRANSPOSED_KERNELS)}"
    return f"conv-k{_nearest(kernel, CONV_KERNELS)}"


def _family(node: NodeInfo, graph: Graph) -> str:
    op = node.op_type
    if op in CONV_OPS and len(node.inputs) > conv_weight_index(op):
        return _conv_family(node, graph)
    if op in MATRIX_OPS:
        weights = [i in graph.initializers for i in node.inputs[:2]]
        return "gemm" if op == "Gemm" or any(weights) else "matmul"
    if op in SIMPLE_FAMILIES:
        return SIMPLE_FAMILIES[op]
    if op.startswith("Reduce"):
        return "reduce"
    if op in ACTIVATIONS or op in ACTIVATION_STAND_INS:
        return f"act-{op}"
    if op in BINARY_OPS:
        return "binary"
    if op in COPY_OPS:
        return f"copy-{op}"
    if op in VIEW_OPS or op in REMOVED_OPS:
        return "view"
    return "other"


def node_features(node: NodeInfo, graph: Graph) -> NodeFeatures:
    """The node's family, FLOPs and bytes touched (inputs, weights and outputs)."""
    return NodeFeatures(_family(node, graph), float(node.flops), float(node.bytes_touched))


def log_features(features: NodeFeatures) -> tuple[float, ...]:
    """Where a node sits on its family's curve: log10 FLOPs and bytes, or bytes alone."""
    log_bytes = math.log10(max(features.bytes, 1.0))
    if features.is_compute:
        return (math.log10(max(features.flops, 1.0)), log_bytes)
    return (log_bytes,)


# -- what ONNX Runtime fuses away ---------------------------------------------------------
# Absorbed by the convolution before them (ConvBNFusion, ConvActivationFusion, ConvAddFusion,
# ConvMulFusion, ConvAddActivationFusion for a residual Add), or by a matrix product
# (MatMulAddFusion, GemmActivationFusion, MatMulScaleFusion).
CONV_EPILOGUE = frozenset({"BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid",
                           "Tanh", "HardSigmoid", "HardSwish"})
ACTIVATION_EPILOGUE = CONV_EPILOGUE - {"BatchNormalization"}
CONV_HOSTS = ("conv", "depthwise", "grouped")
GEMM_EPILOGUE = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid"})
CONSTANT_OPERAND = frozenset({"Add", "Mul", "Sub", "Div"})


@dataclass
class Fusions:
    """What ONNX Runtime's graph optimizer leaves no kernel for, found in one walk in
    topological order: `fused` maps a node's index to the reason, `constant` holds every
    tensor computed from weights alone (folded into a constant before the first run)."""

    graph: Graph
    constant: set[str] = field(default_factory=set)
    host: dict[str, str] = field(default_factory=dict)   # tensor -> kind of kernel making it
    fused: dict[int, str] = field(default_factory=dict)
    # set by wpk.op_patterns: a node that runs as another operator (Erf as the Gelu that
    # replaces its pattern), and bytes a kernel reads beyond its own node (a skip input)
    replaced: dict[int, NodeFeatures] = field(default_factory=dict)
    extra_read: dict[int, int] = field(default_factory=dict)
    activated: set[str] = field(default_factory=set)   # made by a kernel with its activation

    def _sole_reader(self, tensor: str) -> bool:
        return len(self.graph.consumers.get(tensor, ())) == 1 and \
            tensor not in self.graph.outputs

    def visit(self, node: NodeInfo) -> None:
        data = [t for t in node.inputs if t not in self.constant]
        if not data and node.op_type not in ("RandomNormal", "RandomUniform"):
            self.constant.update(node.outputs)
            self.fused[node.index] = "constant-folded"
            return
        if node.op_type in REMOVED_OPS:
            self.fused[node.index] = "removed"
            self._pass_host(node, data)
            return
        host = self.host.get(data[0]) if len(data) == 1 and self._sole_reader(data[0]) \
            else None
        if host is not None and self._absorbs(host, node, data[0]):
            self.fused[node.index] = f"fused into {host}"
            self._pass_host(node, data)
            if node.op_type in ACTIVATION_EPILOGUE:
                self.activated.update(node.outputs)
            return
        if node.op_type in ("Add", "Sum") and len(data) == len(node.inputs) == 2 \
                and self._sum_into_conv(node, data):
            return
        kind = _family(node, self.graph).split("-")[0]
        if kind in COMPUTE_FAMILIES and kind != "transposed":   # no fusions into those
            for out in node.outputs:
                self.host[out] = kind

    def _pass_host(self, node: NodeInfo, data: list[str]) -> None:
        host = self.host.get(data[0]) if data else None
        if host is not None:
            for out in node.outputs:
                self.host[out] = host

    def _sum_into_conv(self, node: NodeInfo, data: list[str]) -> bool:
        """ConvAddActivationFusion: a residual Add of a convolution's (single-use, not yet
        activated) output folds into it, which then reads the other tensor."""
        for tensor, other in ((data[0], data[1]), (data[1], data[0])):
            kind = self.host.get(tensor)
            if kind in CONV_HOSTS and self._sole_reader(tensor) and \
                    tensor not in self.activated and \
                    self.graph.tensors[tensor].shape == self.graph.tensors[other].shape:
                self.fused[node.index] = f"fused into {kind} (sum)"
                self.extra_read[node.index] = self.graph.tensor_bytes(other)
                for out in node.outputs:
                    self.host[out] = kind
                return True
        return False

    def _absorbs(self, host: str, node: NodeInfo, tensor: str) -> bool:
        op = node.op_type
        if op in ACTIVATION_EPILOGUE and tensor in self.activated:
            return False               # one activation per kernel
        constant_operand = op in CONSTANT_OPERAND and any(
            t in self.constant for t in node.inputs)
        if host in CONV_HOSTS:                            # ConvAddFusion, ConvMulFusion
            second = len(node.inputs) == 2 and node.inputs[1] in self.constant
            return op in CONV_EPILOGUE or (constant_operand and second)
        if host == "gemm":
            return op in GEMM_EPILOGUE or constant_operand
        return op in ("Mul", "Div") and constant_operand   # MatMulScaleFusion


def fusions(graph: Graph) -> Fusions:
    """The graph-level fusions and constant folding ONNX Runtime applies on any machine."""
    found = Fusions(graph, set(graph.initializers))
    for node in graph.nodes:
        found.visit(node)
    return found
