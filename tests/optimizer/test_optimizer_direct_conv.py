"""The direct NCHWc convolution that skips all-zero weight rows (sparse weights), checked
against ONNX Runtime inside its own session, and its place in the custom-operator search."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from wpk.optimizer import direct_conv, ort_ops, passes, prune, winograd
from wpk.optimizer.selection import SPARSE_KEPT, select_custom_ops, sparse_sites
from wpk.optimizer.session import DEFAULT_SESSION

RNG = np.random.default_rng(23)
pytestmark = pytest.mark.skipif(not ort_ops.runs_here()[0], reason=ort_ops.runs_here()[1])


def _weight(k: int, c: int, kernel: int, pattern: str) -> np.ndarray:
    weight = (RNG.standard_normal((k, c, kernel, kernel)) / np.sqrt(c * kernel ** 2)).astype(
        np.float32)
    matrix = weight.reshape(k, -1)
    if pattern == "tile":
        matrix *= prune.tile_mask(matrix, 0.75, 32)
    elif pattern == "2:4":
        matrix *= prune.nm_mask(matrix, 2, 4)
    elif pattern == "dead-block":          # a whole output block pruned: no row kept
        matrix[16:32] = 0
    return matrix.reshape(weight.shape)


def _conv_model(c, k, h, w, kernel, stride, pads, weight, residual=False, act="Relu"):
    inits = [numpy_helper.from_array(weight, "W"),
             numpy_helper.from_array(RNG.standard_normal(k).astype(np.float32), "B")]
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["Y0"], name="conv",
                              kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=list(pads))]
    oh = (h + pads[0] + pads[2] - kernel) // stride + 1
    ow = (w + pads[1] + pads[3] - kernel) // stride + 1
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, h, w])]
    out = "Y0"
    if residual:   # computed by a 1x1 Conv (blocked too): ONNX Runtime fuses the Add as a Sum
        assert (oh, ow) == (h, w)
        inits.append(numpy_helper.from_array(_weight(k, c, 1, "tile"), "Ws"))
        nodes.insert(0, helper.make_node("Conv", ["X", "Ws", "B"], ["R"], name="skip",
                                         kernel_shape=[1, 1]))
        nodes.append(helper.make_node("Add", ["R", out], ["Y1"], name="add"))
        out = "Y1"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", [out], ["Y"], name="relu"))
        out = "Y"
    elif act == "Clip":
        inits += [numpy_helper.from_array(np.float32(0), "lo"),
                  numpy_helper.from_array(np.float32(6), "hi")]
        nodes.append(helper.make_node("Clip", [out, "lo", "hi"], ["Y"], name="relu6"))
        out = "Y"
    graph = helper.make_graph(nodes, "conv", inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model)


def _custom_op_session(library, model: onnx.ModelProto) -> ort.InferenceSession:
    """`model` (with our custom operators) in ONNX Runtime, the library registered and no
    graph optimization (the model is ONNX Runtime's saved graph already)."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _offline(model, tmp_path):
    onnx.save(model, str(tmp_path / "m.onnx"))
    passes.ort_offline_optimize(tmp_path / "m.onnx", tmp_path / "m.ort.onnx")
    return onnx.load(str(tmp_path / "m.ort.onnx"))


CASES = [
    # c, k, h, w, kernel, stride, pads (t, l, b, r), residual, activation, weights
    (32, 64, 7, 7, 1, 1, (0, 0, 0, 0), False, "Relu", "tile"),      # flat: 49 pixels, 1 row
    (16, 48, 20, 29, 1, 1, (0, 0, 0, 0), True, "Relu", "dense"),    # rows with a tail tile
    (16, 48, 20, 29, 1, 1, (0, 0, 0, 0), False, "", "dense"),
    (64, 64, 9, 9, 3, 1, (1, 1, 1, 1), True, "Relu", "tile"),
    (32, 32, 15, 13, 3, 2, (1, 1, 1, 1), False, "Clip", "dead-block"),
    (16, 32, 11, 12, 5, 1, (2, 1, 0, 2), False, "Relu", "2:4"),     # asymmetric padding
    (64, 32, 14, 14, 1, 2, (0, 0, 0, 0), False, "", "tile"),       # strided 1x1 (downsample)
    (32, 80, 6, 5, 3, 1, (0, 0, 0, 0), False, "Relu", "tile"),      # valid, output narrow
]


@pytest.mark.parametrize("case", CASES)
def test_direct_kernel_matches_onnxruntime_inside_its_session(case, tmp_path):
    c, k, h, w, kernel, stride, pads, residual, act, pattern = case
    weight = _weight(k, c, kernel, pattern)
    model = _conv_model(c, k, h, w, kernel, stride, pads, weight, residual, act)
    offline = _offline(model, tmp_path)
    sites = ort_ops.direct_sites(offline, model)
    assert len(sites) == 1 + residual
    assert [s.params["residual"] for s in sites].count(True) == residual
    library = ort_ops.build_library([ort_ops.op_kernel(s, i) for i, s in enumerate(sites)])
    rewritten = ort_ops.custom_op_model(offline, sites)
    assert [n.op_type for n in rewritten.graph.node].count("DirectConv") == len(sites)
    session = _custom_op_session(library, rewritten)
    feeds = {"X": RNG.standard_normal((1, c, h, w)).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    for _ in range(3):      # split over the threads: the same answer on every run
        got = session.run(None, feeds)[0]
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error < 1e-5, error


def test_kept_work_follows_the_pattern():
    """Tile-wise rows are skipped; 2:4 zeros different rows in every channel, so a block of
    16 channels keeps (nearly) all of them; a dense weight keeps every row."""
    shape = direct_conv.DirectShape(c=128, k=128, h=8, w=8, kh=3, kw=3, pads=(1, 1, 1, 1))
    kept = {p: direct_conv.kept_fraction(shape, direct_conv.groups_for(
        shape, _weight(128, 128, 3, p))) for p in ("dense", "tile", "2:4", "dead-block")}
    assert kept["dense"] == 1.0 and kept["2:4"] > 0.95
    assert 0.2 < kept["tile"] < 0.45   # 75 % zeros; tiles of live outputs straddle blocks
    assert kept["dead-block"] == pytest.approx(7 / 8)
    weight = _weight(128, 128, 3, "tile")
    groups = direct_conv.groups_for(shape, weight)
    packed = direct_conv.pack_parameters(shape, weight, groups)
    assert packed.size == direct_conv.kept_fraction(shape, groups) * weight.size
    assert np.count_nonzero(packed) == np.count_nonzero(weight)   # every non-zero kept


def _sparse_cnn(pattern: str) -> onnx.ModelProto:
    from wpk.examples import ModelBuilder

    b = ModelBuilder("sparse_cnn", seed=4)
    x = b.input("image", [1, 16, 14, 14])
    y = b.conv(x, 16, 64, 1)
    z = b.conv(y, 64, 64, 3, relu=False)
    x = b.node("Relu", [b.node("Add", [y, z])])
    x = b.node("GlobalAveragePool", [x])
    model = b.build([b.node("Flatten", [x], axis=1)])
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim == 4 and array.shape[0] == 64:
            matrix = array.reshape(64, -1).copy()
            if pattern == "tile":
                matrix *= prune.tile_mask(matrix, 0.75, 32)
            init.CopyFrom(numpy_helper.from_array(matrix.reshape(array.shape), init.name))
    return model


def test_search_takes_sparse_convolutions_and_leaves_dense_ones(tmp_path):
    dense, _ = passes.run_passes(_sparse_cnn("dense"))
    assert sparse_sites(_offline(dense, tmp_path), dense) == {}
    model, _ = passes.run_passes(_sparse_cnn("tile"))
    offline = _offline(model, tmp_path)
    found = sparse_sites(offline, model)
    assert len(found) == 2, found
    for site in found.values():
        shape = direct_conv.direct_shape(site.params)
        assert direct_conv.kept_fraction(
            shape, direct_conv.groups_for(shape, site.weights["Wt"])) <= SPARSE_KEPT
    feed = {"image": RNG.standard_normal((1, 16, 14, 14)).astype(np.float32)}
    names = [o.name for o in model.graph.output]
    # no timing: every site starts from its preferred variant, the direct kernel for sparse
    # weights (also at the 3x3 site, where Winograd variants are the alternatives)
    inside = select_custom_ops(model, offline, dict(DEFAULT_SESSION), feed, names, passes=0,
                               start_with_kernels=True, kinds=("winograd", "direct"))
    assert inside is not None
    assert sorted(s.op for s in inside.specs) == ["nchwc_direct", "nchwc_direct"]
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(names, feed)[0]
    got = _custom_op_session(inside.library, inside.model).run(names, feed)[0]
    assert np.linalg.norm(got - expected) <= winograd.TOLERANCE * np.linalg.norm(expected)


def _gemm_model(m: int, k: int, n: int, op: str, weight: np.ndarray) -> onnx.ModelProto:
    """MatMul + Add (a transformer's projection, rank-3 input) or Gemm with transB (rank 2)."""
    bias = numpy_helper.from_array(RNG.standard_normal(n).astype(np.float32), "B")
    if op == "MatMul":
        nodes = [helper.make_node("MatMul", ["X", "W"], ["Y0"], name="proj"),
                 helper.make_node("Add", ["Y0", "B"], ["Y"], name="bias")]
        x_shape, w = [1, m, k], numpy_helper.from_array(weight.T.copy(), "W")
    else:
        nodes = [helper.make_node("Gemm", ["X", "W", "B"], ["Y"], name="fc", transB=1)]
        x_shape, w = [m, k], numpy_helper.from_array(weight, "W")
    graph = helper.make_graph(nodes, "gemm",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [w, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model)


GEMM_CASES = [
    # m, k, n, op, weights (as (n, k))
    (128, 96, 64, "MatMul", "tile"),
    (7, 40, 48, "Gemm", "tile"),        # rows fewer than a tile, K not a multiple of 16
    (1, 64, 32, "MatMul", "dense"),     # one row (a GEMV)
    (30, 32, 96, "Gemm", "dead-block"),
]


@pytest.mark.parametrize("case", GEMM_CASES)
def test_direct_gemm_matches_onnxruntime_inside_its_session(case, tmp_path):
    m, k, n, op, pattern = case
    weight = _weight(n, k, 1, pattern).reshape(n, k)
    model = _gemm_model(m, k, n, op, weight)
    offline = _offline(model, tmp_path)
    sites = ort_ops.gemm_sites(offline, model)
    assert len(sites) == 1 and sites[0].params["layout"] == "rows"
    library = ort_ops.build_library([ort_ops.op_kernel(sites[0], 0)])
    rewritten = ort_ops.custom_op_model(offline, sites)
    assert [n.op_type for n in rewritten.graph.node].count("DirectGemm") == 1
    session = _custom_op_session(library, rewritten)
    feed = {"X": RNG.standard_normal(session.get_inputs()[0].shape).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = session.run(None, feed)[0]
    assert got.shape == expected.shape
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5


def test_gemms_without_whole_output_blocks_are_left_to_onnxruntime(tmp_path):
    model = _gemm_model(4, 32, 40, "Gemm", _weight(40, 32, 1, "tile").reshape(40, 32))
    assert ort_ops.gemm_sites(_offline(model, tmp_path), model) == []
