"""Shapes where ONNX's shape inference gives up: unused outputs need none, the rest come from
one ONNX Runtime run, and a dynamic model input is refused naming that input."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from wpk.errors import WpkError
from wpk.graph import Graph
from wpk.partitioner.api import partition
from wpk.plan import load_plan
from wpk.partitioner.slicing import random_inputs
from tests.partitioner.test_partition import run_plan_directory, whole_model


def _save(tmp_path, nodes, inputs, outputs, initializers=(), opset=13, name="m"):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 7
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_an_unused_dropout_mask_needs_no_shape(tmp_path):
    """Opset 9's Dropout mask has no inferred shape; nothing reads it (SqueezeNet, AlexNet,
    VGG-19 and Inception v1 in the onnx wheel were refused on it)."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Dropout", ["a"], ["b", "mask"], name="drop", ratio=0.5),
             helper.make_node("Sigmoid", ["b"], ["y"], name="sig")]
    path = _save(tmp_path, nodes, [_float("x", [1, 8])], [_float("y", [1, 8])], opset=9)
    graph = Graph.load(path)
    assert "mask" not in graph.tensors
    assert graph.node("drop").outputs == ("b",)
    result = partition(path, ["device", "edge"], out_dir=tmp_path / "plan",
                       use_calibration=False, pins={"sig": "edge"})
    assert result.plan.tiers[-1].name == "edge"


def test_a_tensor_shape_inference_cannot_follow_gets_its_shape_from_a_run(tmp_path):
    """com.microsoft's Gelu is unknown to ONNX's shape inference; its output crosses the cut."""
    nodes = [helper.make_node("Gelu", ["x"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("Relu", ["g"], ["y"], name="relu")]
    path = _save(tmp_path, nodes, [_float("x", [2, 5, 7])], [_float("y", None)])
    graph = Graph.load(path)
    assert graph.tensors["g"].shape == (2, 5, 7)
    assert graph.tensors["y"].shape == (2, 5, 7)
    out = tmp_path / "plan"
    partition(path, ["device", "edge"], out_dir=out, use_calibration=False,
              pins={"relu": "edge"})
    plan = load_plan(out)
    assert plan.tier("edge").slice_inputs == ["g"]
    feeds = random_inputs(graph, seed=0)
    _, results = run_plan_directory(out, feeds)
    np.testing.assert_allclose(results["y"], whole_model(path, feeds)["y"], rtol=1e-5)


def test_a_dynamic_input_is_refused_naming_it_and_the_flag_that_fixes_it(tmp_path):
    nodes = [helper.make_node("Relu", ["image"], ["y"], name="relu")]
    path = _save(tmp_path, nodes, [_float("image", ["batch", 3, "h", "w"])],
                 [_float("y", None)])
    with pytest.raises(WpkError, match=r"input 'image' .*--input-shape image=Nx3xNxN"):
        Graph.load(path)
    assert Graph.load(path, {"image": (1, 3, 4, 4)}).tensors["y"].shape == (1, 3, 4, 4)


def test_a_branch_reading_outer_weights_runs_where_those_weights_are_sent(tmp_path):
    """An If whose branches read an initializer and a tensor of the main graph: the slice that
    runs the If must carry that initializer and receive that tensor."""
    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(1, 6), "w")
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["a", "w"], ["t"])], "then", [], [_float("t", [1, 6])])
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["a", "w"], ["e"])], "else", [], [_float("e", [1, 6])])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("ReduceSum", ["a"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="positive"),
             helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_branch,
                              else_branch=else_branch)]
    zero = numpy_helper.from_array(np.array(0, dtype=np.float32), "zero")
    path = _save(tmp_path, nodes, [_float("x", [1, 6])], [_float("y", [1, 6])],
                 initializers=[weight, zero])
    graph = Graph.load(path)
    assert set(graph.node("branch").inputs) == {"c", "a", "w"}
    out = tmp_path / "plan"
    partition(path, ["device", "edge"], out_dir=out, use_calibration=False,
              pins={"branch": "edge"}, privacy="none")
    edge = onnx.load(str(out / "edge.onnx"))
    assert "w" in {i.name for i in edge.graph.initializer}
    feeds = random_inputs(graph, seed=0)
    _, results = run_plan_directory(out, feeds)
    np.testing.assert_allclose(results["y"], whole_model(path, feeds)["y"])


def test_shape_arithmetic_is_folded_so_no_batch_size_crosses_a_cut(tmp_path):
    """Exporters compute a reshape's target from the batch dimension at run time. With the
    input shape fixed that is a constant: left in, the batch size crossed the cut and the
    next tier's warm-up on zeros asked for a batch of 0 (BERT from torch's dynamo exporter)."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Shape", ["a"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], name="batch", axis=0),
             helper.make_node("Unsqueeze", ["batch", "zero1"], ["batch1"], name="unsqueeze"),
             helper.make_node("Concat", ["batch1", "minus_one"], ["target"], name="concat",
                              axis=0),
             helper.make_node("Reshape", ["a", "target"], ["y"], name="reshape")]
    constants = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                 numpy_helper.from_array(np.array([0], np.int64), "zero1"),
                 numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    path = _save(tmp_path, nodes, [_float("x", ["batch", 4, 6])], [_float("y", None)],
                 initializers=constants)
    graph = Graph.load(path, {"x": (3, 4, 6)})
    assert [n.op_type for n in graph.nodes] == ["Relu", "Reshape"]
    assert graph.tensors["y"].shape == (3, 24)
    out = tmp_path / "plan"
    partition(graph, ["device", "edge"], out_dir=out, use_calibration=False,
              pins={"reshape": "edge"})
    assert load_plan(out).tier("edge").slice_inputs == ["a"]
    feeds = random_inputs(graph, seed=0)
    _, results = run_plan_directory(out, feeds)
    np.testing.assert_allclose(results["y"], feeds["x"].clip(0).reshape(3, 24))
