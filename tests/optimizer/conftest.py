import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    """Generated kernels compile into a per-session cache (shared by all tests)."""
    monkeypatch.setenv("WPK_KERNEL_CACHE", str(tmp_path_factory.getbasetemp() / "kernels"))


def _single_node_session(op: str, x_shape, weights: dict, inputs: list[str], **attrs):
    """An ORT session running one node on input 'X' with constant `weights`."""
    node = helper.make_node(op, inputs, ["Y"], **attrs)
    graph = helper.make_graph(
        [node], "single", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _small_cnn() -> onnx.ModelProto:
    """ResNet-like with BN, skip, Inception block, depthwise conv, pooling and Gemm: small."""
    from wpk.examples import ModelBuilder

    b = ModelBuilder("small_cnn", seed=5)
    x = b.input("image", [1, 3, 19, 17])
    x = b.node("Relu", [b.batchnorm(b.conv(x, 3, 8, 3, stride=2, relu=False, bias=False), 8)])
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    y = b.conv(x, 8, 8, 3, group=8)           # depthwise
    y = b.conv(y, 8, 8, 1, relu=False)
    x = b.node("Relu", [b.node("Add", [x, y])])
    x = b.node("GlobalAveragePool", [x])
    x = b.node("Flatten", [x], axis=1)
    return b.build([b.gemm(x, 8, 5)])


@pytest.fixture
def single_node_session():
    return _single_node_session


@pytest.fixture
def small_cnn():
    return _small_cnn()
