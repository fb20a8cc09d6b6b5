"""Small models with Conv, MatMul and Gemm weights for the pruning and detection tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def small_net(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """x[N,3,8,8] -> conv1 (3->16) -> conv2 (16->32) -> conv3 (32->64, stride 2) -> flatten
    -> fc (MatMul 1024x128) -> out (Gemm transB, 10 classes); Relu between."""
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)

    inits = [numpy_helper.from_array(weight(16, 3, 3, 3), "c1w"),
             numpy_helper.from_array(weight(32, 16, 3, 3), "c2w"),
             numpy_helper.from_array(weight(64, 32, 3, 3), "c3w"),
             numpy_helper.from_array(weight(1024, 128) * 0.05, "fcw"),
             numpy_helper.from_array(weight(10, 128), "outw"),
             numpy_helper.from_array(np.zeros(10, np.float32), "outb")]
    pads = [1, 1, 1, 1]
    nodes = [helper.make_node("Conv", ["x", "c1w"], ["a"], name="conv1", pads=pads),
             helper.make_node("Relu", ["a"], ["a1"], name="relu1"),
             helper.make_node("Conv", ["a1", "c2w"], ["b"], name="conv2", pads=pads),
             helper.make_node("Relu", ["b"], ["b1"], name="relu2"),
             helper.make_node("Conv", ["b1", "c3w"], ["c"], name="conv3", pads=pads,
                              strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["c1"], name="relu3"),
             helper.make_node("Flatten", ["c1"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "fcw"], ["g"], name="fc"),
             helper.make_node("Relu", ["g"], ["g1"], name="relu4"),
             helper.make_node("Gemm", ["g1", "outw", "outb"], ["y"], name="out", transB=1)]
    graph = helper.make_graph(
        nodes, "small_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def with_weight(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    """A copy of `model` with initializer `name` replaced."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    return copy
