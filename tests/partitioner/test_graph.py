import pytest
from onnx import TensorProto, helper

from wpk.errors import WpkError
from wpk.graph import Graph, parse_input_shapes
from wpk.naming import node_names


def test_resnet_graph_has_skips_and_concat(resnet_path):
    graph = Graph.load(resnet_path)
    ops = [n.op_type for n in graph.nodes]
    assert "Concat" in ops and "Add" in ops
    concat = next(n for n in graph.nodes if n.op_type == "Concat")
    assert len(concat.inputs) == 3
    # topological order: every input is produced earlier
    for node in graph.nodes:
        for tensor in node.inputs:
            if tensor in graph.producer:
                assert graph.producer[tensor] < node.index
    assert graph.sha256 and len(graph.sha256) == 64


def test_conv_flops_and_bytes(resnet_path):
    graph = Graph.load(resnet_path)
    stem = graph.nodes[0]  # 7x7 stride-2 conv, 3 -> 32 channels on 224x224
    assert stem.op_type == "Conv"
    assert stem.flops == 2 * 32 * 112 * 112 * 3 * 7 * 7
    assert stem.bytes_touched == 4 * (3 * 224 * 224 + 32 * 3 * 7 * 7 + 32 * 112 * 112)


def test_gemm_flops(mlp_path):
    graph = Graph.load(mlp_path)
    first = graph.nodes[0]
    assert first.op_type == "Gemm" and first.flops == 2 * 2048 * 2048


def _unnamed_model(batch="N"):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Sigmoid", ["b"], ["y"], name="dup"),
             helper.make_node("Relu", ["b"], ["c"], name="dup")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_unnamed_and_duplicate_nodes_get_stable_names():
    model = _unnamed_model()
    names = node_names(list(model.graph.node))
    assert names == ["Relu_0", "Relu_1", "Sigmoid_2", "Relu_3"]
    assert node_names(list(model.graph.node)) == names  # stable
    graph = Graph.load(model, {"x": (1, 4)})
    assert [n.name for n in graph.nodes] == names


def test_dynamic_batch_needs_input_shape():
    with pytest.raises(WpkError, match="dynamic dimension 'N'.*--input-shape"):
        Graph.load(_unnamed_model())
    graph = Graph.load(_unnamed_model(), parse_input_shapes(["x=3x4"]))
    assert graph.tensors["y"].shape == (3, 4)


@pytest.mark.parametrize("spec, message", [("x", "expected NAME="), ("x=0x4", "positive"),
                                           ("x=ax4", "bad shape")])
def test_bad_input_shapes(spec, message):
    with pytest.raises(WpkError, match=message):
        parse_input_shapes([spec])


def test_input_shape_for_unknown_input():
    with pytest.raises(WpkError, match="not an input"):
        Graph.load(_unnamed_model(), {"nope": (1, 4)})


def test_a_graph_tensor_as_a_tensor_spec(mlp_path):
    from wpk.graph import Graph
    from wpk.tensor_spec import TensorSpec

    spec = Graph.load(mlp_path).tensor_spec("features")
    assert spec == TensorSpec("features", (1, 2048), "float32")
    assert spec.nbytes == 8192 and spec.kserve_datatype == "FP32"
    assert spec.fits((1, 2048)) and not spec.fits((2, 2048))
    assert TensorSpec("x", (-1, 4), "float32").fits((7, 4))
