"""The predictor: operator families, ONNX Runtime's fusions and NCHWc reorders, and times
read off a table's curves."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from wpk import examples
from wpk.graph import Graph
from wpk.op_features import NodeFeatures, fusions, node_features
from wpk.op_layout import nchwc_effects
from wpk.op_predict import Predictor
from wpk.op_table import OpTable

from tests.profile.op_tables import power_law_table


def _model(nodes, inputs, outputs, weights) -> Graph:
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.ones(s, np.float32), n) for n, s in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return Graph.load(model)


def _conv_block() -> Graph:
    """Conv -> BatchNormalization -> Relu -> Add(residual) -> Relu -> Flatten."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Add", ["c2", "r"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
             helper.make_node("Flatten", ["r2"], ["y"], name="flat")]
    weights = {"w": (32, 32, 3, 3), "s": (32,), "b": (32,), "m": (32,), "v": (32,)}
    return _model(nodes, [("x", (1, 32, 8, 8))], ["y"], weights)


def test_families_of_the_example_models(resnet_path, mobilenet_path):
    families = {node_features(n, g).family
                for g in (Graph.load(resnet_path), Graph.load(mobilenet_path)) for n in g.nodes}
    assert {"conv-k7", "conv-k3", "conv-k1", "depthwise-k3", "gemm", "maxpool", "reduce",
            "binary", "copy-Concat", "view"} <= families


def test_graph_level_fusions():
    graph = _conv_block()
    found = fusions(graph)
    names = {graph.nodes[i].name: why for i, why in found.fused.items()}
    # BN and Relu are absorbed by the first Conv; the residual Add by the second (which
    # then reads the other tensor), and the Relu after it too
    assert names == {"bn": "fused into conv", "relu": "fused into conv",
                     "add": "fused into conv (sum)", "relu2": "fused into conv"}
    assert found.extra_read == {graph.node("add").index: graph.tensor_bytes("r")}


def test_nchwc_reorders_at_the_edges_of_a_blocked_chain():
    graph = _conv_block()
    effects = nchwc_effects(graph, fusions(graph), block=16)
    reordered = {graph.nodes[i].name: b for i, b in effects.reorders.items()}
    # the first conv reads the plain input (reorder), Flatten the blocked output (reorder)
    assert reordered == {"conv": [graph.tensor_bytes("x")], "flat": [graph.tensor_bytes("r2")]}
    assert nchwc_effects(graph, fusions(graph), block=0).reorders == {}


def test_convolutions_with_unaligned_channels_stay_plain():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    graph = _model(nodes, [("x", (1, 24, 8, 8))], ["y"], {"w": (24, 24, 1, 1)})
    assert nchwc_effects(graph, fusions(graph), block=16).reorders == {}


def test_predictions_follow_an_exact_power_law():
    """On a table where time = FLOPs / 50 GFLOP/s whatever the bytes, a node between and
    beyond the points is priced on the same law; fused nodes cost nothing; overheads add
    up to the run's and one per kernel."""
    table = OpTable.from_document(power_law_table(node_us=2.0, run_us=20.0, nchwc_block=16))
    predictor = Predictor(table)
    graph = _conv_block()
    for name in ("conv", "conv2"):
        node = graph.node(name)
        ms, family = predictor.kernel_ms(node_features(node, graph))
        assert family == "conv-k3" and ms == pytest.approx(node.flops / 50e9 * 1e3, rel=1e-3)
    far = NodeFeatures("conv-k3", 3e11, 1e9)               # 30x beyond the largest point
    assert predictor.kernel_ms(far)[0] == pytest.approx(3e11 / 50e9 * 1e3, rel=1e-3)
    prediction = predictor.predict(graph)
    assert [prediction.node_ms[graph.node(n).index] for n in ("bn", "relu", "relu2")] == [0] * 3
    assert prediction.total_ms == pytest.approx(float(prediction.node_ms.sum()))
    # kernels: conv, conv2, flatten; reorders: before conv and before flatten
    assert prediction.overhead_ms == pytest.approx(0.020 + 5 * 0.002, abs=1e-9)


def test_one_dimensional_families_interpolate_and_extrapolate_exactly():
    table = OpTable.from_document(power_law_table(gbytes=10.0))
    predictor = Predictor(table)
    for nbytes in (3e5, 7.7e6, 1e11):          # between points, and far beyond them
        ms, family = predictor.kernel_ms(NodeFeatures("binary", nbytes / 10, nbytes))
        assert family == "binary"
        assert ms == pytest.approx(nbytes / 10e9 * 1e3, rel=1e-3)


def test_stand_ins_are_reported_and_scale_applies():
    document = power_law_table(families=("conv-k3", "binary"), scale=2.0)
    predictor = Predictor(OpTable.from_document(document))
    graph = Graph.load(examples.mobilenet_like())
    prediction = predictor.predict(graph)
    assert prediction.stand_ins["depthwise-k3"] == "conv-k3"
    assert prediction.stand_ins["gemm"] == "binary"
    assert predictor.resolve("act-Sigmoid") == "binary"
    unscaled = Predictor(OpTable.from_document({**document, "calibration": {"scale": 1.0}}))
    kernels = prediction.total_ms - prediction.overhead_ms
    base = unscaled.predict(graph)
    assert kernels == pytest.approx(2 * (base.total_ms - base.overhead_ms))


def test_leave_one_out_on_an_exact_law_is_exact():
    ratios = Predictor(OpTable.from_document(power_law_table())).leave_one_out()
    assert set(ratios) >= {"binary", "conv-k3"}
    assert np.allclose(ratios["binary"], 1.0, rtol=1e-3)


def test_a_model_whose_weights_come_from_constant_nodes():
    """The onnx wheel's light models compute weights with ConstantOfShape: folded, free."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"], name="make_w",
                              value=numpy_helper.from_array(np.ones(1, np.float32))),
             helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 16, 8, 8))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([16, 16, 1, 1], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = Graph.load(model)
    found = fusions(g)
    assert found.fused == {g.node("make_w").index: "constant-folded"}
    assert "w" in found.constant
    effects = nchwc_effects(g, found, block=16)
    # in: the plain input; out: the model's output leaves the blocked layout
    assert effects.reorders == {g.node("conv").index: [g.tensor_bytes("x"), g.tensor_bytes("y")]}


def test_nchwc_rules_for_constant_operands_and_narrow_convolutions():
    """An Add of a constant stays plain (its input is reordered out); a convolution with
    fewer input channels than a block reads the plain layout (a blocked input is reordered
    out for it), as in ORT's transformer."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "three"], ["a"], name="add_const"),
             helper.make_node("Conv", ["c", "narrow"], ["n"], name="narrow"),
             helper.make_node("Conv", ["n", "wide"], ["y"], name="wide")]
    weights = {"w": (8, 16, 1, 1), "three": (1,), "narrow": (16, 8, 1, 1),
               "wide": (16, 16, 1, 1)}
    graph = _model(nodes, [("x", (1, 16, 8, 8))], ["a", "y"], weights)
    effects = nchwc_effects(graph, fusions(graph), block=16)
    reordered = {graph.nodes[i].name: b for i, b in effects.reorders.items()}
    c = graph.tensor_bytes("c")
    # "c" (8 blocked channels) is reordered out once, for the first plain reader
    assert reordered == {"conv": [graph.tensor_bytes("x")], "add_const": [c],
                         "wide": [graph.tensor_bytes("y")]}


def test_transformer_patterns_fuse_as_onnx_runtime_does():
    """Erf-based GELU becomes one Gelu kernel; Add -> LayerNormalization one
    SkipLayerNormalization; a Transpose of the last two axes folds into its MatMul."""
    from wpk.op_patterns import all_fusions

    nodes = [helper.make_node("Add", ["x", "h"], ["s"], name="skip"),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["n"], axis=-1, name="ln"),
             helper.make_node("Div", ["n", "sqrt2"], ["d"], name="div"),
             helper.make_node("Erf", ["d"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["e1"], name="plus1"),
             helper.make_node("Mul", ["n", "e1"], ["m"], name="times_x"),
             helper.make_node("Mul", ["m", "half"], ["gelu"], name="half"),
             helper.make_node("Transpose", ["gelu"], ["t"], perm=[0, 2, 1], name="t"),
             helper.make_node("MatMul", ["n", "t"], ["y"], name="mm")]
    weights = {"g": (16,), "b": (16,), "sqrt2": (1,), "one": (1,), "half": (1,)}
    graph = _model(nodes, [("x", (1, 16, 16)), ("h", (1, 16, 16))], ["y"], weights)
    found = all_fusions(graph)
    names = {graph.nodes[i].name: why for i, why in found.fused.items()}
    assert names == {"skip": "fused into SkipLayerNormalization", "div": "fused into Gelu",
                     "plus1": "fused into Gelu", "times_x": "fused into Gelu",
                     "half": "fused into Gelu", "t": "fused into MatMul"}
    assert found.replaced[graph.node("erf").index].family == "act-Gelu"
    assert found.extra_read == {graph.node("ln").index: graph.tensor_bytes("h")}


def test_a_constant_first_operand_is_not_folded_into_the_convolution():
    """ORT's ConvMulFusion / ConvAddFusion read the constant as the second input only
    (PaddlePaddle exports write `Mul(scale, conv)`: it runs as its own kernel)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Mul", ["s", "c"], ["m"], name="scale_first"),
             helper.make_node("Conv", ["m", "w"], ["c2"], name="conv2"),
             helper.make_node("Mul", ["c2", "s"], ["y"], name="scale_second")]
    graph = _model(nodes, [("x", (1, 16, 8, 8))], ["y"], {"w": (16, 16, 1, 1), "s": (1,)})
    fused = {graph.nodes[i].name for i in fusions(graph).fused}
    assert fused == {"scale_second"}


def test_the_in_network_scale_follows_the_footprint_fit():
    """Between the calibration networks' footprints the scale follows the fitted line;
    beyond them it stays at the end values; without a fit the table's one scale."""
    from wpk.op_calibrate import footprint_bytes, scale_for

    fit = {"center": 7.0, "intercept": 0.0, "slope": 0.2, "low": 6.0, "high": 8.0}
    assert scale_for(fit, 1e7) == pytest.approx(1.0)
    assert scale_for(fit, 1e8) == pytest.approx(np.exp(0.2))
    assert scale_for(fit, 1e12) == pytest.approx(np.exp(0.2))      # flat beyond the range
    assert scale_for(fit, 1e3) == pytest.approx(np.exp(-0.2))
    graph = _conv_block()
    document = power_law_table(scale=1.5)
    assert Predictor(OpTable.from_document(document)).scale_for(graph) == 1.5
    document["calibration"]["footprint"] = fit
    predictor = Predictor(OpTable.from_document(document))
    assert predictor.scale_for(graph) == pytest.approx(scale_for(fit, footprint_bytes(graph)))
    assert Predictor(OpTable.from_document(document), calibrated=False).scale_for(graph) == 1
