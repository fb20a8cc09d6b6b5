"""Built-in example models, generated in code (no model hub is needed).

- `resnet_like`: a ResNet-style CNN with skip connections and one Inception-style block whose
  parallel branches meet in a Concat (a DAG, not a chain).
- `mobilenet_like`: MobileNetV2-style inverted residual blocks with depthwise convolutions.
- `mlp`: a plain chain of Gemm + Relu layers.
- `random_dag(n)`: a generated DAG of about n nodes with branches and skips, for benchmarks.

`wpk-examples DIR` writes the three example models to DIR.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from wpk.errors import WpkError, cli_entry

OPSET = 17
IR_VERSION = 9  # readable by every onnxruntime >= 1.16


class ModelBuilder:
    """A few lines per layer: keeps the example generators readable."""

    def __init__(self, name: str, seed: int = 0):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.counter = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def input(self, name: str, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def weight(self, prefix: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        std = scale if scale is not None else np.sqrt(2.0 / max(fan_in, 1))
        name = self.fresh(prefix)
        data = (self.rng.standard_normal(shape) * std).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(data, name))
        return name

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        node_name = name or self.fresh(op.lower() + "_")
        output = node_name + "_out"
        self.nodes.append(helper.make_node(op, inputs, [output], name=node_name, **attrs))
        return output

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1,
             relu: bool = True, bias: bool = True) -> str:
        w = self.weight("w", (cout, cin // group, k, k))
        ins = [x, w] + ([self.weight("b", (cout,), 0.01)] if bias else [])
        y = self.node("Conv", ins, kernel_shape=[k, k], strides=[stride, stride],
                      pads=[k // 2] * 4, group=group)
        return self.node("Relu", [y]) if relu else y

    def batchnorm(self, x: str, channels: int) -> str:
        scale = self._const("bn_scale", 1.0 + 0.1 * self.rng.standard_normal(channels))
        shift = self._const("bn_shift", 0.1 * self.rng.standard_normal(channels))
        mean = self._const("bn_mean", 0.1 * self.rng.standard_normal(channels))
        var = self._const("bn_var", 1.0 + 0.1 * np.abs(self.rng.standard_normal(channels)))
        return self.node("BatchNormalization", [x, scale, shift, mean, var])

    def gemm(self, x: str, n_in: int, n_out: int) -> str:
        return self.node("Gemm", [x, self.weight("fc_w", (n_out, n_in)),
                                  self.weight("fc_b", (n_out,), 0.01)], transB=1)

    def _const(self, prefix: str, values: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def build(self, outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs,
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="wpk.examples")
        model.ir_version = IR_VERSION
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model)
        return model


def resnet_like(image_size: int = 224, width: int = 32, classes: int = 1000) -> onnx.ModelProto:
    """ResNet-style: stem, 4 stages of basic blocks with skips, an Inception-style block."""
    b = ModelBuilder("resnet_like", seed=1)
    x = b.input("image", [1, 3, image_size, image_size])
    x = b.batchnorm(b.conv(x, 3, width, 7, stride=2, relu=False, bias=False), width)
    x = b.node("Relu", [x])
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels = width
    for stage, cout in enumerate([width, width * 2, width * 4, width * 8]):
        stride = 1 if stage == 0 else 2
        shortcut = x if stride == 1 and cout == channels else \
            b.conv(x, channels, cout, 1, stride=stride, relu=False)
        y = b.conv(x, channels, cout, 3, stride=stride)
        y = b.conv(y, cout, cout, 3, relu=False)
        x = b.node("Relu", [b.node("Add", [y, shortcut])])
        channels = cout
        if stage == 1:  # Inception-style block: three branches joined by Concat
            branch_1 = b.conv(x, channels, channels // 2, 1)
            branch_3 = b.conv(b.conv(x, channels, channels // 4, 1), channels // 4,
                              channels // 4, 3)
            pooled = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1],
                            pads=[1, 1, 1, 1])
            branch_p = b.conv(pooled, channels, channels // 4, 1)
            x = b.node("Concat", [branch_1, branch_3, branch_p], axis=1)
    x = b.node("GlobalAveragePool", [x])
    x = b.node("Flatten", [x], axis=1)
    logits = b.gemm(x, channels, classes)
    return b.build([logits])


def mobilenet_like(image_size: int = 224, classes: int = 1000) -> onnx.ModelProto:
    """MobileNetV2-style: inverted residual blocks (expand 1x1, depthwise 3x3, project 1x1)."""
    b = ModelBuilder("mobilenet_like", seed=2)
    x = b.input("image", [1, 3, image_size, image_size])
    x = b.conv(x, 3, 16, 3, stride=2)
    channels = 16
    # (expansion, out channels, repeats, first stride)
    for expansion, cout, repeats, first_stride in [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2),
                                                   (4, 64, 2, 2), (4, 96, 1, 1), (4, 160, 2, 2)]:
        for r in range(repeats):
            stride = first_stride if r == 0 else 1
            hidden = channels * expansion
            y = b.conv(x, channels, hidden, 1) if expansion != 1 else x
            y = b.conv(y, hidden, hidden, 3, stride=stride, group=hidden)
            y = b.conv(y, hidden, cout, 1, relu=False)
            x = b.node("Add", [x, y]) if stride == 1 and cout == channels else y
            channels = cout
    x = b.conv(x, channels, 640, 1)
    x = b.node("GlobalAveragePool", [x])
    x = b.node("Flatten", [x], axis=1)
    return b.build([b.gemm(x, 640, classes)])


def depthwise_block(cin: int, c: int, h: int, w: int, kernel: int = 3, stride: int = 1,
                    pads: tuple[int, int, int, int] = (1, 1, 1, 1), relu_expand: bool = True,
                    relu: bool = True, expose_expansion: bool = False) -> onnx.ModelProto:
    """An inverted residual's first half on input [1, 16, h, w]: a 3x3 conv to cin channels
    (c where cin is 0), the 1x1 expansion cin -> c (none where cin is 0), a depthwise KxK
    conv; `expose_expansion` makes the expanded tensor a second output."""
    b = ModelBuilder("depthwise_block", seed=7)
    x = b.conv(b.input("x", [1, 16, h, w]), 16, cin or c, 3)
    outputs = []
    if cin:
        x = b.conv(x, cin, c, 1, relu=relu_expand)
        if expose_expansion:
            outputs.append(x)
    weight, bias = b.weight("w", (c, 1, kernel, kernel)), b.weight("b", (c,), 0.1)
    y = b.node("Conv", [x, weight, bias], kernel_shape=[kernel, kernel], strides=[stride] * 2,
               pads=list(pads), group=c)
    return b.build([b.node("Relu", [y]) if relu else y] + outputs)


def mlp(features: int = 2048, hidden: tuple[int, ...] = (2048, 1024, 1024, 512, 256),
        classes: int = 10) -> onnx.ModelProto:
    """A plain chain: Gemm + Relu layers, e.g. for vibration or spectrum features."""
    b = ModelBuilder("mlp", seed=3)
    x = b.input("features", [1, features])
    width = features
    for h in hidden:
        x = b.node("Relu", [b.gemm(x, width, h)])
        width = h
    return b.build([b.node("Softmax", [b.gemm(x, width, classes)], axis=1)])


def random_dag(n_nodes: int, width: int = 64, seed: int = 0) -> onnx.ModelProto:
    """A DAG of about `n_nodes` small nodes: chains of MatMul/Relu with skips and merges."""
    b = ModelBuilder(f"random_dag_{n_nodes}", seed=seed)
    rng = np.random.default_rng(seed)
    frontier = [b.input("x", [1, width])]
    recent: list[str] = list(frontier)
    while len(b.nodes) < n_nodes:
        source = recent[-1] if rng.random() < 0.7 else recent[int(rng.integers(len(recent)))]
        choice = rng.random()
        if choice < 0.4:
            y = b.node("MatMul", [source, b.weight("m", (width, width))])
        elif choice < 0.7 or len(recent) < 2:
            y = b.node("Relu", [source])
        else:
            other = recent[int(rng.integers(max(0, len(recent) - 8), len(recent)))]
            y = b.node("Add", [source, other])
        recent.append(y)
        recent = recent[-32:]
    consumed = {i for node in b.nodes for i in node.input}
    outputs = [n.output[0] for n in b.nodes if n.output[0] not in consumed]
    return b.build(outputs)


EXAMPLES = {"resnet_like": resnet_like, "mobilenet_like": mobilenet_like, "mlp": mlp}


def write_examples(directory: str | Path) -> list[Path]:
    """Write every example model to `directory`; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in EXAMPLES.items():
        path = directory / f"{name}.onnx"
        onnx.save(build(), str(path))
        paths.append(path)
    return paths


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wpk-examples", description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default="examples/models")
    args = parser.parse_args(argv)
    try:
        paths = write_examples(args.directory)
    except OSError as error:
        raise WpkError(f"{args.directory}: cannot write the examples ({error.strerror})") \
            from None
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
