"""Fused expansion + depthwise NCHWc kernels as ONNX Runtime custom operators: they match ONNX
Runtime inside its own session (odd sizes, strides, padding, 5x5, padded input blocks, both
work splits), the sites are found (and fused only where the expansion has no other reader),
and a slice optimized with them loads and serves the original outputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from wpk.errors import WpkError
from wpk.examples import ModelBuilder, depthwise_block
from wpk.optimizer import depthwise, ort_ops, passes, winograd
from wpk.optimizer.executor import load
from wpk.optimizer.pipeline import save_custom_ops
from wpk.optimizer.selection import custom_op_variants, select_custom_ops
from wpk.optimizer.session import DEFAULT_SESSION

RNG = np.random.default_rng(5)
pytestmark = pytest.mark.skipif(not ort_ops.runs_here()[0], reason=ort_ops.runs_here()[1])


def _offline(model, tmp_path):
    onnx.save(model, str(tmp_path / "m.onnx"))
    passes.ort_offline_optimize(tmp_path / "m.onnx", tmp_path / "m.ort.onnx")
    return onnx.load(str(tmp_path / "m.ort.onnx"))


def _feed(model):
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": RNG.standard_normal(dims).astype(np.float32)}


CASES = [
    # cin (0: no expansion), c, h, w, kernel, stride, pads (t, l, b, r), relu_expand, relu
    (0, 16, 11, 9, 3, 1, (1, 1, 1, 1), True, True),      # depthwise alone, odd sizes
    (24, 32, 13, 13, 3, 2, (1, 1, 1, 1), True, True),    # padded input block, stride 2
    (16, 48, 7, 10, 3, 2, (0, 0, 1, 1), True, False),    # asymmetric padding, 3 blocks
    (32, 64, 9, 5, 5, 1, (2, 2, 2, 2), True, True),      # 5x5, narrower than the tile
    (16, 32, 6, 6, 3, 1, (1, 1, 1, 1), False, True),     # expansion without Relu
    (40, 32, 3, 17, 3, 1, (0, 1, 0, 1), True, True),     # three rows, no row padding
]


@pytest.mark.parametrize("case", CASES)
def test_fused_depthwise_matches_onnxruntime_inside_its_session(case, tmp_path):
    cin, c = case[0], case[1]
    model = depthwise_block(*case)
    offline = _offline(model, tmp_path)
    feed = _feed(model)
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    sites = ort_ops.depthwise_sites(offline, model)
    assert len(sites) == 1 and sites[0].params["cin"] == cin
    assert len(sites[0].node.split("+")) == (2 if cin else 1)
    variants = custom_op_variants(sites[0], winograd.VARIANTS)
    assert set(variants) == {f"hb{hb}" for hb in (1, 2, 4) if c // 16 % hb == 0}
    for key, spec in variants.items():
        library = ort_ops.build_library([ort_ops.op_kernel(spec, 0)])
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(library))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        rewritten = ort_ops.custom_op_model(offline, [spec])
        assert [n.op_type for n in rewritten.graph.node].count("DepthwiseConv") == 1
        assert not any(n.op_type == "Conv" and n.name in spec.node.split("+")
                       for n in rewritten.graph.node)
        got = ort.InferenceSession(rewritten.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"]).run(None, feed)[0]
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error < 1e-5, (key, error)


def test_expansion_read_elsewhere_is_not_fused(tmp_path):
    """The expanded tensor is also a graph output: the fused kernel would not produce it, so
    only the depthwise convolution is a site."""
    model = depthwise_block(16, 32, 8, 8, 3, 1, (1, 1, 1, 1), expose_expansion=True)
    sites = ort_ops.depthwise_sites(_offline(model, tmp_path), model)
    assert [s.params["cin"] for s in sites] == [0]


def test_packed_parameters_skip_padded_input_channels():
    shape = depthwise.DepthwiseShape(c=32, h=4, w=4, cin=24)
    expand = RNG.standard_normal((32, 24, 1, 1)).astype(np.float32)
    packed = depthwise.pack_parameters(shape, RNG.standard_normal((32, 1, 3, 3)),
                                       expand, np.ones(32, np.float32))
    assert packed.size == shape.parameter_count == 32 * 32 + 32 + 32 * 9
    weights = packed[:32 * 32].reshape(2, 32, 16)       # [hidden block][input channel][16]
    assert np.array_equal(weights[1, :24, 3], expand[16 + 3, :, 0, 0])
    assert not weights[:, 24:].any()                      # padded input channels: zero


def test_a_kernel_of_another_op_type_is_refused_at_load(tmp_path):
    model = depthwise_block(0, 16, 8, 8, 3, 1, (1, 1, 1, 1))
    offline = _offline(model, tmp_path)
    spec = ort_ops.depthwise_sites(offline, model)[0]
    rewritten = ort_ops.custom_op_model(offline, [spec])
    from .test_optimizer_winograd import _conv_model, _spec

    winograd_spec = _spec(_conv_model(16, 16, 8, 8, (1, 1, 1, 1), True, False, False), 2,
                          "tiles")
    library = ort_ops.build_library([ort_ops.op_kernel(winograd_spec, 0)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with pytest.raises(Exception, match=r"DepthwiseConv: attribute 'kernel' \(0\) names no "
                                        r"DepthwiseConv kernel"):
        ort.InferenceSession(rewritten.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])


def _inverted_residual_net():
    b = ModelBuilder("inverted", seed=9)
    x = b.input("x", [1, 16, 24, 24])
    x = b.conv(x, 16, 32, 1)
    for stride in (1, 2):
        y = b.conv(x, 32, 64, 1)
        y = b.conv(y, 64, 64, 3, stride=stride, group=64)
        y = b.conv(y, 64, 32, 1, relu=False)
        x = b.node("Add", [x, y]) if stride == 1 else y
    x = b.node("GlobalAveragePool", [x])
    return b.build([b.node("Flatten", [x], axis=1)])


def _inverted_residuals(cin, hidden, cout, size, stride, relu_project=False):
    """Two inverted residuals on [1, 16, size, size]: (cin -> hidden -> cout, `stride`), then
    (cout -> hidden -> cout, stride 1, with the skip); hidden == cin: no expansion."""
    b = ModelBuilder("inverted_residuals", seed=4)
    x = b.conv(b.input("x", [1, 16, size, size]), 16, cin, 3)
    for block_in, block_stride in ((cin, stride), (cout, 1)):
        y = b.conv(x, block_in, hidden, 1) if hidden != block_in else x
        y = b.conv(y, hidden, hidden, 3, stride=block_stride, group=hidden)
        y = b.conv(y, hidden, cout, 1, relu=relu_project)
        x = b.node("Add", [x, y]) if block_stride == 1 and block_in == cout else y
    return b.build([x])


@pytest.mark.parametrize("case", [
    (24, 96, 24, 13, 1, False),     # padded blocks in and out, the skip on both blocks
    (16, 16, 16, 15, 1, False),     # no expansion (MobileNetV2's first block)
    (32, 64, 40, 9, 2, True),       # stride 2, Relu after the projection (the skip's Add
    #                                 stays a node), 40 -> 48 padded
])
def test_whole_inverted_residuals_match_onnxruntime(case, tmp_path):
    cin, hidden, cout = case[:3]
    model = _inverted_residuals(*case)
    offline = _offline(model, tmp_path)
    feed = _feed(model)
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    plain = {s.params["name"]: s for s in ort_ops.depthwise_sites(offline, model)}
    sites = ort_ops.depthwise_sites(offline, model, project=True)
    assert len(sites) == 2 and all(s.params["name"] in plain for s in sites)
    assert [s.params["cout"] for s in sites] == [cout, cout]
    assert [len(s.node.split("+")) for s in sites] == [3 if hidden != cin else 2,
                                                       3 if hidden != cout else 2]
    # ONNX Runtime fuses the skip's Add into the projection unless a Relu comes between
    assert sites[1].params["residual"] == (not case[5])
    assert bool(sites[1].params["relu_project"]) == case[5]
    per_site = [[v for k, v in custom_op_variants(plain[site.params["name"]],
                                                  winograd.VARIANTS, site).items()
                 if k.startswith("project")] for site in sites]
    assert [len(v) for v in per_site] == [1 + (hidden // 16 % 4 == 0)] * 2
    specs = [spec for variants in per_site for spec in variants]
    library = ort_ops.build_library([ort_ops.op_kernel(s, i) for i, s in enumerate(specs)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for variant in range(len(per_site[0])):          # each variant on both blocks
        first, second = variant, len(per_site[0]) + variant
        rewritten = ort_ops.custom_op_model(offline, [specs[first], specs[second]],
                                            [first, second])
        assert [n.op_type for n in rewritten.graph.node].count("DepthwiseConv") == 2
        assert not any(n.op_type == "Conv" and n.domain == ort_ops.NCHWC_DOMAIN and
                       n.name in specs[first].node.split("+") + specs[second].node.split("+")
                       for n in rewritten.graph.node)
        got = ort.InferenceSession(rewritten.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"]).run(None, feed)[0]
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error < 1e-5, (first, error)


def test_selected_depthwise_slice_loads_and_serves_the_original_outputs(tmp_path):
    model, _ = passes.run_passes(_inverted_residual_net())
    offline = _offline(model, tmp_path)
    feed = {"x": RNG.standard_normal((1, 16, 24, 24)).astype(np.float32)}
    names = [o.name for o in model.graph.output]
    # passes=0: no timing, every site runs its preferred variant (the whole inverted residual)
    inside = select_custom_ops(model, offline, dict(DEFAULT_SESSION), feed, names,
                               kinds=("nchwc_depthwise",), passes=0)
    assert inside is not None
    assert [(s.op, s.params["cin"], s.params["stride"], s.params.get("cout")) for s in
            inside.specs] == [("nchwc_depthwise", 32, 1, 32), ("nchwc_depthwise", 32, 2, 32)]
    # the timed descent visits every site once per pass and says what it kept
    timed = select_custom_ops(model, offline, dict(DEFAULT_SESSION), feed, names,
                              kinds=("nchwc_depthwise",), passes=1)
    if timed is not None:
        assert [c.op for c in timed.choices] == ["nchwc_depthwise-op"] * 2
        assert {c.chosen for c in timed.choices} <= {"kernel", "ort"}
    directory = save_custom_ops(model, inside, tmp_path / "opt")
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(names, feed)[0]
    got = load(directory).run(None, feed)[0]
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


def _run(offline, specs, feed):
    library = ort_ops.build_library([ort_ops.op_kernel(s, i) for i, s in enumerate(specs)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    rewritten = ort_ops.custom_op_model(offline, specs)
    return ort.InferenceSession(rewritten.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("after", ["Mul", "Add"])
def test_a_projection_ort_folded_something_into_is_not_fused(after, tmp_path):
    """ONNX Runtime folds a per-channel Mul or Add after the projection into its weights and
    bias; the original projection's parameters are then not what it computes."""
    b = ModelBuilder("folded", seed=3)
    x = b.conv(b.input("x", [1, 16, 10, 10]), 16, 32, 3)
    y = b.conv(b.conv(x, 32, 64, 1), 64, 64, 3, group=64)
    y = b.conv(y, 64, 32, 1, relu=False)
    y = b.node(after, [y, b.weight("s", (32, 1, 1), 1.0)])
    model = b.build([y])
    offline = _offline(model, tmp_path)
    assert ort_ops.depthwise_sites(offline, model, project=True) == []
    sites = ort_ops.depthwise_sites(offline, model)        # expansion + depthwise still fuse
    feed = _feed(model)
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = _run(offline, sites, feed)
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


def test_an_expansion_of_plain_nchw_input_is_not_fused(tmp_path):
    """With 8 channels ONNX Runtime hands the expansion plain NCHW (after a ReorderOutput):
    only the depthwise convolution is a site, and it matches."""
    model = depthwise_block(8, 16, 10, 10, 3, 1, (1, 1, 1, 1))
    offline = _offline(model, tmp_path)
    sites = ort_ops.depthwise_sites(offline, model)
    assert [s.params["cin"] for s in sites] == [0]
    feed = _feed(model)
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.linalg.norm(_run(offline, sites, feed) - expected) <= \
        1e-5 * np.linalg.norm(expected)


def test_sites_sharing_a_node_are_never_both_chosen(tmp_path):
    """MobileNetV1-style depthwise -> 1x1 -> depthwise -> 1x1: the middle 1x1 conv is the
    first block's projection and the second one's expansion."""
    b = ModelBuilder("v1", seed=1)
    x = b.conv(b.input("x", [1, 16, 12, 12]), 16, 32, 3)
    for cin, cout in ((32, 64), (64, 64)):
        x = b.conv(b.conv(x, cin, cin, 3, group=cin), cin, cout, 1)
    model = b.build([x])
    offline = _offline(model, tmp_path)
    projected = ort_ops.depthwise_sites(offline, model, project=True)
    plain = ort_ops.depthwise_sites(offline, model)
    with pytest.raises(WpkError, match="is in two kernels"):
        ort_ops.custom_op_model(offline, [projected[0], plain[1]])
    feed = _feed(model)
    inside = select_custom_ops(model, offline, dict(DEFAULT_SESSION), feed,
                               [o.name for o in model.graph.output],
                               kinds=("nchwc_depthwise",), passes=0)
    names = [n for s in inside.specs for n in s.node.split("+")]
    assert len(names) == len(set(names))
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.linalg.norm(inside_run(inside, feed) - expected) <= \
        1e-5 * np.linalg.norm(expected)


def inside_run(inside, feed):
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(inside.library))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(inside.model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, feed)[0]


SESSIONS_COME_AND_GO = """
import gc, os, sys
import numpy as np
import onnxruntime as ort

library, model_file, feed_file = sys.argv[1:4]
rewritten = open(model_file, "rb").read()
feed = dict(np.load(feed_file))


def one_session():
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(rewritten, options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    del session, options
    gc.collect()


def resident_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


for _ in range(120):
    one_session()
before = resident_mb()
for _ in range(100):
    one_session()
print(resident_mb() - before)
"""


def test_sessions_come_and_go_without_leaking_kernel_scratch(tmp_path):
    """Each session loads the library and runs the kernel on its own pool threads; their
    per-thread scratch (here 88 KB) must go with them, and with the library. Measured in a
    fresh process: the test process's RSS also moves with what earlier tests left in it."""
    import subprocess
    import sys

    model = depthwise_block(160, 640, 4, 112, 3, 1, (1, 1, 1, 1))
    offline = _offline(model, tmp_path)
    spec = ort_ops.depthwise_sites(offline, model, hb=4, threads=2)[0]
    library = ort_ops.build_library([ort_ops.op_kernel(spec, 0)])
    model_file, feed_file = tmp_path / "rewritten.onnx", tmp_path / "feed.npz"
    model_file.write_bytes(ort_ops.custom_op_model(offline, [spec]).SerializeToString())
    np.savez(feed_file, **_feed(model))
    result = subprocess.run([sys.executable, "-c", SESSIONS_COME_AND_GO, str(library),
                             str(model_file), str(feed_file)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    # growth over the last 100 of 220 sessions; leaking each thread's scratch would be 17.5 MB
    assert float(result.stdout) < 6


def test_the_profiler_names_every_chosen_kernel_and_the_nodes_it_replaces(tmp_path):
    """The descent's verdicts come from ONNX Runtime's per-node profile: each custom node and
    each replaced node must be found there by name, or no site gets a verdict."""
    from wpk.optimizer.selection import profiled_times

    model, _ = passes.run_passes(_inverted_residual_net())
    offline = _offline(model, tmp_path)
    feed = {"x": RNG.standard_normal((1, 16, 24, 24)).astype(np.float32)}
    names = [o.name for o in model.graph.output]
    inside = select_custom_ops(model, offline, dict(DEFAULT_SESSION), feed, names,
                               kinds=("nchwc_depthwise",), passes=0)
    library = ort_ops.build_library([ort_ops.op_kernel(s, i) for i, s in enumerate(inside.specs)])
    chosen = {i: i for i in range(len(inside.specs))}
    times = profiled_times(offline, inside.specs, chosen, dict(DEFAULT_SESSION), feed, names,
                           library)
    assert sorted(times) == [0, 1]
    assert all(0 < ours < 1e5 and 0 < theirs < 1e5 for ours, theirs in times.values()), times
