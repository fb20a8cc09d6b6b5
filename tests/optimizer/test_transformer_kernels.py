"""The transformer kernels (`layer_norm.py`, `nan_guard.py`, `attention_kernel.py`) as custom
operators in ONNX Runtime's saved graph: found on torch's exports of BERT
(`blocks/export_blocks.py`), equal to ONNX Runtime on the original model with every key
masked, some or none; layer norms checked against a float64 reference on rows with a large
mean; attention against ONNX Runtime's own MultiHeadAttention (bias shared, per head, none;
keys of another length); refused where the kernels cannot run them; and the same in the
portable build."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.optimizer.test_optimizer_direct_conv import _custom_op_session, _offline
from wpk.optimizer import ort_ops, passes, transformer_sites
from wpk.optimizer.selection import select_custom_ops
from wpk.optimizer.session import DEFAULT_SESSION

BLOCKS = Path(__file__).parent / "blocks"
MASKS = {"padded": np.r_[np.ones(10), np.zeros(6)], "all keys": np.ones(16),
         "no key": np.zeros(16)}    # every key masked: the softmax gives NaN, the guard 0
RNG = np.random.default_rng(7)
needs_kernels = pytest.mark.skipif(ort_ops.library_isa() is None,
                                   reason="custom operators need a C compiler")


def _feed(mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(0).integers(0, 100, (1, 16)),
            "attention_mask": mask.astype(np.int64)[None]}


def _with_kernels(offline: onnx.ModelProto, specs: list, isa: str | None = None):
    library = ort_ops.build_library([ort_ops.op_kernel(s, i, isa) for i, s in enumerate(specs)])
    return _custom_op_session(library, ort_ops.custom_op_model(offline, specs))


def _transformer_sites(offline: onnx.ModelProto, model: onnx.ModelProto) -> list:
    return transformer_sites.sites(offline, model, ("layer_norm", "nan_guard", "attention"))


@needs_kernels
@pytest.mark.parametrize("attention,guards", [("sdpa", 2), ("eager", 0)])
def test_encoder_layer_norms_nan_guards_and_attention_run_as_kernels_with_the_same_outputs(
        attention, guards, tmp_path):
    """Two encoder layers: the embeddings' layer norm and two per layer (ONNX Runtime's
    SkipLayerNormalization), each layer's attention (ONNX Runtime's packed `Attention`: the
    QKV projection becomes a MatMul before the kernel), and sdpa's NaN guard after it."""
    original = onnx.load(str(BLOCKS / f"bert_{attention}_encoder.onnx"))
    model, _ = passes.run_passes(original)
    offline = _offline(model, tmp_path)
    specs = _transformer_sites(offline, model)
    counts = Counter(s.op for s in specs)
    assert counts == {"layer_norm": 5, "attention": 2, **({"nan_guard": guards} if guards else {})}
    assert all(s.params["packed"] for s in specs if s.op == "attention")
    assert sum(s.params["skip"] for s in specs if s.op == "layer_norm") >= 4
    session = _with_kernels(offline, specs)
    reference = ort.InferenceSession(original.SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    for name, mask in MASKS.items():
        expected = reference.run(None, _feed(mask))[0]
        got = session.run(None, _feed(mask))[0]
        assert not np.isnan(got).any(), name
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected), name


def _layer_norm_model(shape: tuple[int, ...], bias: bool, epsilon: float = 1e-5,
                      outputs: int = 1) -> onnx.ModelProto:
    width = shape[-1]
    inits = [helper.make_tensor("scale", TensorProto.FLOAT, [width], RNG.standard_normal(width)),
             helper.make_tensor("bias", TensorProto.FLOAT, [width], RNG.standard_normal(width))]
    names = ["y", "mean", "inv_std"][:outputs]
    node = helper.make_node("LayerNormalization", ["x", "scale", "bias"][:3 if bias else 2],
                            names, name="ln", axis=-1, epsilon=epsilon)
    graph = helper.make_graph(
        [node], "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
        inits if bias else inits[:1])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@needs_kernels
@pytest.mark.parametrize("shape,bias", [((1, 7, 48), True), ((33, 256), False),
                                        ((2, 3, 5, 16), True)])
def test_layer_norm_matches_a_float64_reference_on_rows_with_a_large_mean(shape, bias,
                                                                          tmp_path):
    """Rows of 1000 + N(0, 1): a float32 sum of the raw values would lose the mean's last
    digits, and E[x²] - E[x]² most of the variance's; the kernel shifts and centres first,
    so its error stays at the rounding of the inputs (ulp(1000) = 6e-5)."""
    model = _layer_norm_model(shape, bias)
    offline = _offline(model, tmp_path)
    (site,) = transformer_sites.layer_norm_sites(offline, model)
    x = (1000 + RNG.standard_normal(shape)).astype(np.float32)
    got = _with_kernels(offline, [site]).run(None, {"x": x})[0]
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    gamma, beta = site.weights["gamma"], site.weights["beta"]
    expected = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_layer_norms_the_kernel_cannot_run_are_left_to_onnxruntime(tmp_path):
    """Rows that are not whole 16-float vectors, and a node whose mean output is read."""
    for model in (_layer_norm_model((4, 40), True), _layer_norm_model((4, 32), True, outputs=2)):
        assert transformer_sites.layer_norm_sites(_offline(model, tmp_path), model) == []


def _nan_guard_model(shape: tuple[int, ...], fill: float) -> onnx.ModelProto:
    nodes = [helper.make_node("IsNaN", ["x"], ["nan"], name="isnan"),
             helper.make_node("Where", ["nan", "fill", "x"], ["y"], name="where")]
    graph = helper.make_graph(
        nodes, "guard", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor("fill", TensorProto.FLOAT, [], [fill])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 128, 256), (3, 1001)])
def test_nan_guard_replaces_exactly_the_nans(shape, tmp_path):
    model = _nan_guard_model(shape, -2.5)
    offline = _offline(model, tmp_path)
    (site,) = transformer_sites.nan_guard_sites(offline, model)
    x = RNG.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[::7] = np.nan
    x.reshape(-1)[3] = np.inf
    got = _with_kernels(offline, [site]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, np.where(np.isnan(x), np.float32(-2.5), x))


def test_a_nan_test_read_elsewhere_is_no_guard_site(tmp_path):
    model = _nan_guard_model((4, 16), 0.0)
    model.graph.output.append(helper.make_tensor_value_info("nan", TensorProto.BOOL, None))
    assert transformer_sites.nan_guard_sites(_offline(model, tmp_path), model) == []


@pytest.mark.skipif(ort_ops.portable_target() != "x86-64-v3" or
                    not ort_ops.portable_runs_here()[0],
                    reason="the portable build runs here on x86-64-v3 only")
def test_the_portable_build_runs_the_kernels(tmp_path):
    original = onnx.load(str(BLOCKS / "bert_sdpa_encoder.onnx"))
    model, _ = passes.run_passes(original)
    offline = _offline(model, tmp_path)
    specs = _transformer_sites(offline, model)
    assert Counter(s.op for s in specs) == {"layer_norm": 5, "attention": 2, "nan_guard": 2}
    session = _with_kernels(offline, specs, isa="portable")
    for mask in MASKS.values():
        expected = ort.InferenceSession(original.SerializeToString(),
                                        providers=["CPUExecutionProvider"]).run(
            None, _feed(mask))[0]
        got = session.run(None, _feed(mask))[0]
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


def _encoder_with_every_kernel(tmp_path: Path):
    """(the sdpa encoder, ORT's saved graph of it after wpk's passes, a padded feed,
    `select_custom_ops`' choice starting with every kernel in)."""
    original = onnx.load(str(BLOCKS / "bert_sdpa_encoder.onnx"))
    model, _ = passes.run_passes(original)
    offline = _offline(model, tmp_path)
    feed = _feed(MASKS["padded"])
    inside = select_custom_ops(model, offline, dict(DEFAULT_SESSION), feed, ["y"], passes=0,
                               start_with_kernels=True)
    return original, offline, feed, inside


@needs_kernels
def test_the_custom_op_search_takes_the_encoder_kernels(tmp_path):
    """`select_custom_ops` finds the sites among its kinds and starts with every kernel in."""
    original, offline, feed, inside = _encoder_with_every_kernel(tmp_path)
    assert inside is not None
    kinds = sorted({s.op for s in inside.specs})
    assert kinds == ["attention", "layer_norm", "nan_guard"], kinds
    got = _custom_op_session(inside.library, inside.model).run(None, feed)[0]
    expected = ort.InferenceSession(original.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


def _multi_head_model(s: int, keys: int, heads: int, head_size: int, bias_heads: int,
                      key_padding_mask: bool = False, **attributes) -> onnx.ModelProto:
    """One ONNX Runtime MultiHeadAttention over Q [1, s, D], K and V [1, keys, D], with an
    attention bias [1, bias_heads, s, keys] as an input (none where bias_heads is 0)."""
    hidden = heads * head_size
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, s, hidden]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, keys, hidden]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, keys, hidden])]
    names = ["q", "k", "v", "", ""]
    if key_padding_mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [1, keys]))
        names[4] = "mask"
    if bias_heads:
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT,
                                                    [1, bias_heads, s, keys]))
        names.append("bias")
    node = helper.make_node("MultiHeadAttention", names, ["y"], name="mha",
                            domain="com.microsoft", num_heads=heads, **attributes)
    graph = helper.make_graph([node], "mha", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             [1, s, hidden])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


@needs_kernels
@pytest.mark.parametrize("s,keys,bias_heads,scale", [(16, 32, 1, None), (15, 32, 3, None),
                                                     (16, 16, 0, None), (17, 16, 1, 0.3)])
def test_attention_kernel_matches_onnxruntime_multi_head_attention(s, keys, bias_heads, scale,
                                                                   tmp_path):
    """Queries 16, 15 or 17 (the kernel takes rows two at a time), keys 32 or 16, 3 heads
    of 16; a bias shared by the heads, one per head, or none; ONNX Runtime's scale or one
    given; with -inf in the bias (masked keys) and one row masked whole (NaN out, as ONNX
    Runtime gives it)."""
    model = _multi_head_model(s, keys, 3, 16, bias_heads, **({"scale": scale} if scale else {}))
    offline = _offline(model, tmp_path)
    (site,) = transformer_sites.attention_sites(offline, model)
    assert not site.params["packed"] and site.params["bias_heads"] == bias_heads
    feed = {name: RNG.standard_normal((1, n, 48)).astype(np.float32)
            for name, n in (("q", s), ("k", keys), ("v", keys))}
    if bias_heads:
        bias = RNG.standard_normal((1, bias_heads, s, keys)).astype(np.float32)
        bias[..., 3, ::3] = -np.inf
        bias[..., 5, :] = -np.inf
        feed["bias"] = bias
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = _with_kernels(offline, [site]).run(None, feed)[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("why,model", [
    ("heads of 8 floats", _multi_head_model(16, 16, 3, 8, 1)),
    ("causal", _multi_head_model(16, 16, 2, 16, 1, unidirectional=1)),
    ("key padding mask", _multi_head_model(16, 16, 2, 16, 1, key_padding_mask=True))])
def test_attention_the_kernel_cannot_run_is_left_to_onnxruntime(why, model, tmp_path):
    assert transformer_sites.attention_sites(_offline(model, tmp_path), model) == [], why


@needs_kernels
def test_packed_attention_kernel_adds_the_qkv_bias_like_onnxruntime(tmp_path):
    """ONNX Runtime's `Attention` with random QKV weights and biases (the BERT blocks'
    biases are all zero, as transformers initializes them): the MatMul + kernel pair gives
    ONNX Runtime's outputs."""
    s, heads, head_size = 16, 2, 16
    hidden = heads * head_size
    inits = [numpy_helper.from_array(RNG.standard_normal((hidden, 3 * hidden)).astype(
                 np.float32) / 4, "w"),
             numpy_helper.from_array(RNG.standard_normal(3 * hidden).astype(np.float32), "b")]
    node = helper.make_node("Attention", ["x", "w", "b", "", "", "bias"], ["y"], name="att",
                            domain="com.microsoft", num_heads=heads)
    graph = helper.make_graph(
        [node], "att", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, s, hidden]),
                        helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 1, s, s])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, s, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    offline = _offline(model, tmp_path)
    (site,) = transformer_sites.attention_sites(offline, model)
    assert site.params["packed"]
    feed = {"x": RNG.standard_normal((1, s, hidden)).astype(np.float32),
            "bias": np.where(RNG.random((1, 1, s, s)) < 0.2, -1e4, 0.0).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = _with_kernels(offline, [site]).run(None, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_the_end_to_end_gain_is_split_into_replaced_nodes_other_nodes_and_time_outside(
        tmp_path):
    """gain_breakdown.in_place: the kernels are the nodes only the rewritten graph has (one
    per site, two for packed attention: the MatMul before it), the replaced ones those only
    the saved graph has; every part is measured; parallel execution compares whole runs
    only; a spent budget skips the split; the report names the offline candidate's share."""
    from wpk.optimizer import gain_breakdown

    _, offline, feed, inside = _encoder_with_every_kernel(tmp_path)
    split = gain_breakdown.in_place(offline, inside.model, dict(DEFAULT_SESSION), feed, ["y"],
                                    inside.library, runs=10)
    sites = Counter(s.op for s in inside.specs)
    assert split["kernel_nodes"] == len(inside.specs) + sites["attention"]
    replaced = {n.name for n in offline.graph.node} - {n.name for n in inside.model.graph.node}
    assert split["replaced_nodes"] == len(replaced) >= len(inside.specs)
    assert split["runs"] == 10 and all(np.isfinite(split[key]) for key in (
        "replaced_ms", "other_nodes_ms", "outside_nodes_ms", "run_ms", "unprofiled_ms"))
    text = gain_breakdown.explain("custom-ops", {"kernels": 9, "operator_gains_ms": 0.5,
                                                 "end_to_end_gain_ms": 2.0, "in_place": split,
                                                 "offline_gain_ms": 0.75})
    assert "0.750 ms is the offline candidate's" in text and "1.250 ms the kernels'" in text
    assert f"{split['outside_nodes_ms']:.3f} ms outside node kernels" in text
    assert f"Without the profiler they save {split['unprofiled_ms']:.3f} ms" in text
    parallel = gain_breakdown.in_place(offline, inside.model, {**DEFAULT_SESSION,
                                       "execution_mode": "parallel"}, feed, ["y"],
                                       inside.library, runs=5)
    assert parallel["parallel"] and "replaced_ms" not in parallel
    skipped = gain_breakdown.in_place_or_why_not(offline, inside.model, dict(DEFAULT_SESSION),
                                                 feed, ["y"], inside.library, seconds_left=5)
    assert "time budget" in skipped["skipped"]
    assert "Not split" in gain_breakdown.explain("custom-ops", {
        "kernels": 1, "operator_gains_ms": 0.1, "end_to_end_gain_ms": 0.1,
        "in_place": skipped})
