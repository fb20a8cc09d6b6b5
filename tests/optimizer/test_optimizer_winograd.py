"""Winograd 3x3 convolutions match ONNX Runtime (odd sizes, padding, channel counts that are
not multiples of 16, fused bias / residual Add / Relu), and a slice that runs them gives the
original model's outputs."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from wpk.optimizer import winograd
from wpk.optimizer.executor import load
from wpk.optimizer.kernels import load_initializers
from wpk.optimizer.pipeline import save_segmented
from wpk.optimizer.selection import select_winograd, shapes_of
from wpk.optimizer.session import DEFAULT_SESSION

RNG = np.random.default_rng(7)
pytestmark = pytest.mark.skipif(not winograd.supported()[0], reason=winograd.supported()[1])


def _conv_model(c, k, h, w, pads, bias, residual, relu):
    weight = (RNG.standard_normal((k, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W")]
    inputs = ["X", "W"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(k).astype(np.float32), "B"))
        inputs.append("B")
    nodes = [helper.make_node("Conv", inputs, ["Y0"], name="conv", pads=list(pads),
                              kernel_shape=[3, 3])]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, h, w])]
    out = "Y0"
    oh, ow = h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2
    if residual:
        nodes.append(helper.make_node("Add", ["R", out], ["Y1"], name="add"))
        graph_inputs.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, [1, k, oh, ow]))
        out = "Y1"
    if relu:
        nodes.append(helper.make_node("Relu", [out], ["Y"], name="relu"))
        out = "Y"
    graph = helper.make_graph(nodes, "conv", graph_inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model)


def conv_case_feeds(model, case, rng=RNG):
    """Random inputs for a `_conv_model(*case)` (X, and R where it has a residual) and what
    ONNX Runtime computes from them."""
    c, k, h, w, pads, bias, residual, relu = case
    feeds = {"X": rng.standard_normal((1, c, h, w)).astype(np.float32)}
    if residual:
        oh, ow = h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2
        feeds["R"] = rng.standard_normal((1, k, oh, ow)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return feeds, expected


def _spec(model, m, split):
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return winograd.winograd_spec(model.graph.node[0], consumers,
                                  {o.name for o in model.graph.output}, shapes_of(model),
                                  load_initializers(model), m=m, split=split)


CASES = [
    # c, k, h, w, pads (t, l, b, r), bias, residual, relu
    (3, 5, 7, 9, (1, 1, 1, 1), True, False, False),
    (17, 33, 13, 11, (1, 1, 1, 1), True, True, True),     # channels not multiples of 16
    (16, 16, 1, 19, (1, 1, 1, 1), False, False, True),    # one row
    (20, 8, 10, 23, (0, 2, 1, 0), True, True, False),     # asymmetric padding
    (32, 48, 18, 17, (0, 0, 0, 0), True, False, True),    # no padding (valid)
    (64, 64, 6, 5, (2, 1, 2, 2), True, True, True),       # output larger than the input
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("m,split", [(2, "tiles"), (4, "tiles"), (4, "channels"),
                                     (2, "channels")])
def test_winograd_matches_onnxruntime(case, m, split):
    c, k, h, w, pads, bias, residual, relu = case
    model = _conv_model(c, k, h, w, pads, bias, residual, relu)
    feeds, expected = conv_case_feeds(model, case)
    spec = _spec(model, m, split)
    assert spec is not None and spec.params["residual"] == residual and \
        spec.params["relu"] == relu
    out = winograd.WinogradKernel(spec)(feeds)
    assert out.shape == expected.shape
    error = np.linalg.norm(out - expected) / np.linalg.norm(expected)
    assert error < winograd.TOLERANCE, error
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_only_3x3_stride1_dense_convolutions_are_taken():
    model = _conv_model(8, 8, 9, 9, (1, 1, 1, 1), True, False, False)
    conv = model.graph.node[0]
    for attr, value in [("strides", [2, 2]), ("dilations", [2, 2]), ("group", 2)]:
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        node = changed.graph.node[0]
        node.attribute.append(helper.make_attribute(attr, value))
        if attr == "group":
            del changed.graph.initializer[0]
            changed.graph.initializer.insert(0, numpy_helper.from_array(
                np.zeros((8, 4, 3, 3), np.float32), "W"))
        assert _spec(changed, 4, "tiles") is None, attr
    assert conv.op_type == "Conv" and _spec(model, 4, "tiles") is not None


def test_transformed_weights_reproduce_a_direct_convolution():
    """U = G w G^T then A^T [(U) . (B^T d B)] A equals the 3x3 correlation of one tile."""
    for m in (2, 4):
        mats = winograd.MATRICES[m]
        bt = np.array(mats["BT"], float)
        at = np.array(mats["AT"], float)
        w = RNG.standard_normal((1, 1, 3, 3))
        d = RNG.standard_normal((m + 2, m + 2))
        u = winograd.transform_weights(w.astype(np.float32), m)[:, 0, 0].reshape(m + 2, m + 2)
        y = at @ (u * (bt @ d @ bt.T)) @ at.T
        direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * w[0, 0]) for j in range(m)]
                           for i in range(m)])
        np.testing.assert_allclose(y, direct, rtol=1e-5, atol=1e-5)


def test_slice_with_winograd_kernels_gives_the_original_outputs(tmp_path):
    from wpk.examples import ModelBuilder

    b = ModelBuilder("wino_cnn", seed=3)
    x = b.input("image", [1, 3, 21, 19])
    x = b.conv(x, 3, 24, 3, stride=2)
    y = b.conv(x, 24, 24, 3)
    y = b.conv(y, 24, 24, 3, relu=False)
    x = b.node("Relu", [b.node("Add", [y, x])])
    x = b.node("GlobalAveragePool", [x])
    model = b.build([b.node("Flatten", [x], axis=1)])
    choices = select_winograd(model, load_initializers(model), dict(DEFAULT_SESSION),
                              margin=float("inf"))       # take every kernel, fast or not
    assert [c.chosen for c in choices] == ["kernel", "kernel"]
    assert "+" in choices[1].node and choices[1].spec.params["residual"]
    save_segmented(model, [c.spec for c in choices], tmp_path)
    optimized = load(tmp_path)
    assert "wpk.generated-c" in optimized.get_providers()
    reference = ort.InferenceSession(model.SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    for seed in range(2):
        feed = {"image": np.random.default_rng(seed).random((1, 3, 21, 19), dtype=np.float32)}
        expected = reference.run(None, feed)[0]
        out = optimized.run(None, feed)[0]
        assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 1e-4


def test_pool_runs_every_item_exactly_once_also_from_concurrent_callers():
    import ctypes
    import threading

    from wpk.optimizer.build import compile_c
    from wpk.optimizer.pool import load_pool

    load_pool()
    source = r"""
    extern void wpk_pool_run(void (*fn)(int, int, void*), void* ctx, int total);
    static void item(int i, int slot, void* ctx) { ((int*)ctx)[i] += 1; (void)slot; }
    void fill(int* counts, int n) { wpk_pool_run(item, counts, n); }
    """
    library = ctypes.CDLL(str(compile_c(source, "pool_probe")))
    arrays = [np.zeros(997, np.int32) for _ in range(4)]

    def work(counts):
        for _ in range(50):
            library.fill(ctypes.c_void_p(counts.ctypes.data), ctypes.c_int(counts.size))

    threads = [threading.Thread(target=work, args=(a,)) for a in arrays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for counts in arrays:
        assert (counts == 50).all()


def test_residual_from_a_later_downsample_conv_runs_after_it(tmp_path):
    """torch's ResNet export order: conv2, then the downsample Conv whose output the fused
    Conv+Add+Relu kernel reads as its residual (crashed the "mixed" candidate)."""
    from wpk.examples import ModelBuilder

    b = ModelBuilder("downsample_block", seed=5)
    image = b.input("image", [1, 16, 14, 14])
    y = b.conv(image, 16, 32, 3, stride=2)
    y = b.conv(y, 32, 32, 3, relu=False)            # the Winograd site, before ...
    shortcut = b.conv(image, 16, 32, 1, stride=2, relu=False)   # ... its residual's producer
    model = b.build([b.node("Relu", [b.node("Add", [y, shortcut])])])
    order = [n.op_type for n in model.graph.node]
    assert order.index("Add") > 2 and order.count("Conv") == 3
    choices = select_winograd(model, load_initializers(model), dict(DEFAULT_SESSION),
                              margin=float("inf"))
    fused = [c for c in choices if c.spec.params["residual"]]
    assert len(fused) == 1 and fused[0].chosen == "kernel"
    save_segmented(model, [c.spec for c in fused], tmp_path)
    feed = {"image": np.random.default_rng(1).random((1, 16, 14, 14), dtype=np.float32)}
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    out = load(tmp_path).run(None, feed)[0]
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) < 1e-4
