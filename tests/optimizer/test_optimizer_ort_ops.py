"""Winograd kernels as ONNX Runtime custom operators: the C ABI indices the glue uses are those
of the installed ONNX Runtime, the NCHWc kernels inside ONNX Runtime's own saved graph match
ONNX Runtime, bad inputs are clear errors, and an optimized directory built this way loads
(and falls back to plain ONNX Runtime where its kernels cannot run)."""
import ctypes
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from wpk.optimizer import ort_ops, passes, winograd
from wpk.optimizer.executor import MANIFEST, load
from wpk.optimizer.pipeline import save_custom_ops
from wpk.optimizer.selection import select_custom_ops
from wpk.optimizer.session import DEFAULT_SESSION

from .test_optimizer_winograd import _conv_model, conv_case_feeds

RNG = np.random.default_rng(11)
pytestmark = pytest.mark.skipif(not ort_ops.runs_here()[0], reason=ort_ops.runs_here()[1])


def _api_table():
    path = os.path.join(os.path.dirname(ort.__file__), "capi")
    libraries = [f for f in os.listdir(path) if f.startswith("libonnxruntime.so")]
    if not libraries:
        pytest.skip("this onnxruntime wheel has no separate libonnxruntime.so")
    library = ctypes.CDLL(os.path.join(path, libraries[0]))
    library.OrtGetApiBase.restype = ctypes.POINTER(ctypes.c_void_p)
    base = library.OrtGetApiBase()
    get_api = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint32)(base[0])
    return get_api(ort_ops.API_LEVEL)


def test_api_indices_are_those_of_the_installed_onnxruntime():
    """Two entries whose behaviour identifies them: CreateStatus / GetErrorMessage round-trip,
    and KernelContext_ParallelFor (the highest index we use) refusing a null context."""
    api = _api_table()
    assert api, f"ONNX Runtime does not offer C API level {ort_ops.API_LEVEL}"
    index = ort_ops.API_INDEX
    create = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)(
        api[index["CREATE_STATUS"]])
    message = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(api[2])
    assert message(create(2, b"wpk")) == b"wpk"
    parallel_for = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p)(
        api[index["KERNEL_CONTEXT_PARALLEL_FOR"]])
    assert message(parallel_for(None, None, 0, 0, None)) == b"Invalid context"
    build_info = ctypes.CFUNCTYPE(ctypes.c_char_p)(api[254])  # GetBuildInfoString
    assert build_info().startswith(b"ORT Build Info")


def _offline(model, tmp_path):
    onnx.save(model, str(tmp_path / "m.onnx"))
    passes.ort_offline_optimize(tmp_path / "m.onnx", tmp_path / "m.ort.onnx")
    return onnx.load(str(tmp_path / "m.ort.onnx"))


CASES = [
    # c, k, h, w, pads (t, l, b, r), bias, residual, relu: whole 16-channel blocks only
    (16, 16, 9, 9, (1, 1, 1, 1), True, True, True),
    (32, 48, 18, 17, (0, 0, 0, 0), True, False, True),     # no padding, 3 output blocks
    (64, 64, 6, 5, (2, 1, 2, 2), True, True, True),        # output larger than the input
    (16, 32, 13, 1, (1, 1, 1, 1), True, False, False),      # one column
    (32, 16, 23, 10, (0, 2, 1, 0), True, False, True),      # asymmetric padding
]


@pytest.mark.parametrize("case", CASES)
def test_nchwc_kernels_match_onnxruntime_inside_its_session(case, tmp_path):
    model = _conv_model(*case)
    offline = _offline(model, tmp_path)
    feeds, expected = conv_case_feeds(model, case, RNG)
    for m, split in winograd.VARIANTS:
        sites = ort_ops.nchwc_sites(offline, model, m=m, split=split)
        assert len(sites) == 1 and sites[0].params["layout"] == "nchwc"
        library = ort_ops.build_library([ort_ops.op_kernel(sites[0], 0)])
        options = ort.SessionOptions()
        options.register_custom_ops_library(str(library))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        rewritten = ort_ops.custom_op_model(offline, sites)
        assert [n.op_type for n in rewritten.graph.node].count(ort_ops.OP_TYPES["winograd"]) == 1
        session = ort.InferenceSession(rewritten.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)[0]
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error < winograd.TOLERANCE, (m, split, error)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a race needs two threads")
def test_kernels_split_for_many_threads_give_the_same_output_on_every_run(tmp_path):
    """A kernel sized for 16 threads here splits 12 tiles into 12 one-tile items, so
    neighbouring tiles are written by different threads at once. GCC 12's predictive
    commoning once made such a kernel reload a neighbour's output and store it back stale
    (wrong tiles in 20-70 % of runs; first seen on a 16-core box)."""
    case = (64, 64, 6, 5, (2, 1, 2, 2), True, True, True)
    model = _conv_model(*case)
    offline = _offline(model, tmp_path)
    feeds, expected = conv_case_feeds(model, case, RNG)
    sites = ort_ops.nchwc_sites(offline, model, m=2, split="tiles", threads=16)
    library = ort_ops.build_library([ort_ops.op_kernel(sites[0], 0)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ort_ops.custom_op_model(offline, sites).SerializeToString(),
                                   options, providers=["CPUExecutionProvider"])
    errors = [np.linalg.norm(session.run(None, feeds)[0] - expected) / np.linalg.norm(expected)
              for _ in range(60)]
    assert max(errors) < winograd.TOLERANCE, sum(e >= winograd.TOLERANCE for e in errors)


def test_partial_blocks_are_left_to_onnxruntime(tmp_path):
    """17 input or 40 output channels: ONNX Runtime pads the blocks (or feeds NCHW to an
    NCHWc Conv); such convolutions are not sites."""
    for case in [(17, 32, 9, 9, (1, 1, 1, 1), True, False, True),
                 (32, 40, 9, 9, (1, 1, 1, 1), True, False, True),
                 (3, 16, 9, 9, (1, 1, 1, 1), True, False, True)]:
        model = _conv_model(*case)
        assert ort_ops.nchwc_sites(_offline(model, tmp_path), model) == []


def _single_op_model(c=16, k=16, h=8, w=8):
    """One WinogradConv (NCHW layout) whose X has a free shape, to feed it wrong inputs."""
    model = _conv_model(c, k, h, w, (1, 1, 1, 1), True, False, False)
    from .test_optimizer_winograd import _spec

    spec = _spec(model, 2, "tiles")
    rewritten = ort_ops.custom_op_model(model, [spec])
    x = rewritten.graph.input[0].type.tensor_type.shape
    for dim, name in zip(x.dim, "nchw"):
        dim.Clear()
        dim.dim_param = name
    library = ort_ops.build_library([ort_ops.op_kernel(spec, 0)])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    options.log_severity_level = 4
    return ort.InferenceSession(rewritten.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]), model


def test_wrong_input_shape_is_a_clear_error_not_a_crash():
    session, model = _single_op_model()
    good = RNG.standard_normal((1, 16, 8, 8)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, {"X": good})
    got = session.run(None, {"X": good})[0]
    assert np.linalg.norm(got - expected[0]) <= 1e-5 * np.linalg.norm(expected[0])
    with pytest.raises(Exception, match=r"WinogradConv wpk_winograd_0: input X must be a "
                                        r"float32 tensor of shape \[1, 16, 8, 8\]"):
        session.run(None, {"X": RNG.standard_normal((1, 16, 9, 8)).astype(np.float32)})
    assert session.run(None, {"X": good})[0].shape == (1, 16, 8, 8)  # still serving


def test_unknown_kernel_index_is_refused_at_load(tmp_path):
    model = _conv_model(16, 16, 8, 8, (1, 1, 1, 1), True, False, False)
    from .test_optimizer_winograd import _spec

    spec = _spec(model, 2, "tiles")
    library = ort_ops.build_library([ort_ops.op_kernel(spec, 0)])
    rewritten = ort_ops.custom_op_model(model, [spec], indices=[3])
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    with pytest.raises(Exception, match=r"WinogradConv: attribute 'kernel' \(3\) names no "
                                        r"WinogradConv kernel"):
        ort.InferenceSession(rewritten.SerializeToString(), options,
                             providers=["CPUExecutionProvider"]).run(
            None, {"X": np.zeros((1, 16, 8, 8), np.float32)})


def _two_block_cnn():
    from wpk.examples import ModelBuilder

    b = ModelBuilder("two_blocks", seed=3)
    x = b.input("image", [1, 16, 20, 20])
    y = b.conv(x, 16, 32, 3)
    z = b.conv(y, 32, 32, 3, relu=False)
    x = b.node("Relu", [b.node("Add", [y, z])])
    x = b.node("GlobalAveragePool", [x])
    return b.build([b.node("Flatten", [x], axis=1)])


def test_selected_slice_loads_and_falls_back_to_plain_onnxruntime(tmp_path, monkeypatch):
    model, _ = passes.run_passes(_two_block_cnn())
    offline = _offline(model, tmp_path)
    feed = {"image": RNG.standard_normal((1, 16, 20, 20)).astype(np.float32)}
    names = [o.name for o in model.graph.output]
    # no timing: every site runs its first variant, so the test does not depend on timing
    inside = select_custom_ops(model, offline, dict(DEFAULT_SESSION), feed, names, passes=0,
                               start_with_kernels=True)
    assert inside is not None and len(inside.specs) == 2
    # the second convolution carries ORT's fused Sum (the skip) and Relu into the kernel
    assert [(s.params["residual"], s.params["relu"]) for s in inside.specs] == \
        [(False, "relu"), (True, "relu")]
    directory = save_custom_ops(model, inside, tmp_path / "opt")
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(names, feed)[0]
    session = load(directory)
    assert session.segments[0].model_file == "model.wpk.onnx"
    got = session.run(None, feed)[0]
    assert np.linalg.norm(got - expected) <= winograd.TOLERANCE * np.linalg.norm(expected)
    # where the kernels cannot run: plain ONNX Runtime on model.onnx, with one warning
    monkeypatch.setattr(ort_ops, "runs_here", lambda: (False, "no AVX-512 (test)"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = load(directory)
    assert plain.segments[0].model_file == "model.onnx"
    assert any("no AVX-512 (test)" in str(w.message) for w in caught)
    assert np.allclose(plain.run(None, feed)[0], expected, rtol=1e-5, atol=1e-6)
    # a library from before the build the directory records is never trusted
    monkeypatch.undo()
    directory = Path(shutil.copytree(directory, tmp_path / "opt-old"))
    manifest = directory / MANIFEST
    stale = json.loads(manifest.read_text())
    assert stale["segments"][0].pop("library_build") == ort_ops.LIBRARY_BUILD
    manifest.write_text(json.dumps(stale))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = load(directory)
    assert old.segments[0].model_file == "model.onnx"
    assert any("run wpk-optimize again" in str(w.message) for w in caught)
    # the custom-op graph itself missing: the same fallback, with a warning naming it
    directory = Path(shutil.copytree(tmp_path / "opt", tmp_path / "opt-no-graph"))
    (directory / "model.wpk.onnx").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = load(directory)
    assert plain.segments[0].model_file == "model.onnx"
    assert any("model.wpk.onnx is missing" in str(w.message) for w in caught)


def test_custom_op_graph_keeps_no_unused_initializers(tmp_path):
    model, _ = passes.run_passes(_two_block_cnn())
    offline = _offline(model, tmp_path)
    sites = ort_ops.nchwc_sites(offline, model)
    rewritten = ort_ops.custom_op_model(offline, sites)
    used = {name for node in rewritten.graph.node for name in node.input}
    assert {i.name for i in rewritten.graph.initializer} <= used
    assert any(o.domain == ort_ops.DOMAIN for o in rewritten.opset_import)
    node = next(n for n in rewritten.graph.node if n.op_type == ort_ops.OP_TYPES["winograd"])
    assert numpy_helper.to_array(next(i for i in rewritten.graph.initializer
                                      if i.name == node.input[1])).shape == (36, 16, 32)
    assert helper.get_attribute_value(node.attribute[0]) == 0
    assert TensorProto.FLOAT == rewritten.graph.input[0].type.tensor_type.elem_type


def _inverted_residual_net():
    from .test_optimizer_depthwise_ops import _inverted_residual_net as build

    return build()


@pytest.mark.parametrize("build", [_two_block_cnn, _inverted_residual_net])
def test_runtime_serves_a_plan_whose_tier_runs_custom_operators(build, tmp_path):
    """wpk-partition -> a tier optimized with custom operators (Winograd; fused depthwise)
    -> tier servers on 127.0.0.1 -> tritonclient: the whole model's outputs."""
    import subprocess
    import sys

    triton = pytest.importorskip("tritonclient.grpc")
    from wpk.plan import load_plan, slice_path

    from .test_optimizer_runtime_serving import _serve_plan

    model = build()
    input_name = model.graph.input[0].name
    input_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    model_path = tmp_path / "model.onnx"
    onnx.save(model, str(model_path))
    plan_dir = tmp_path / "plan"
    result = subprocess.run([sys.executable, "-m", "wpk.partitioner.cli", str(model_path), "-o",
                             str(plan_dir), "--no-calibrate", "--privacy", "none"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    plan = load_plan(plan_dir)
    feed = {input_name: RNG.standard_normal(input_shape).astype(np.float32)}
    served = 0
    for tier in (t for t in plan.tiers if t.slice):
        slice_model, _ = passes.run_passes(onnx.load(str(slice_path(plan_dir, tier))))
        offline = _offline(slice_model, tmp_path)
        if not (ort_ops.nchwc_sites(offline, slice_model) or
                ort_ops.depthwise_sites(offline, slice_model)):
            continue
        inputs = {i.name: RNG.standard_normal([d.dim_value for d in
                                               i.type.tensor_type.shape.dim]).astype(np.float32)
                  for i in slice_model.graph.input}
        inside = select_custom_ops(slice_model, offline, dict(DEFAULT_SESSION), inputs,
                                   [o.name for o in slice_model.graph.output], passes=0,
                                   start_with_kernels=True)
        directory = save_custom_ops(slice_model, inside, plan_dir / "optimized" / tier.name)
        assert load(directory).segments[0].model_file == "model.wpk.onnx"
        tier.optimized = f"optimized/{tier.name}"
        served += 1
    assert served, "no tier of the plan has a convolution to run as a custom operator"
    plan.save(plan_dir)
    addresses, close = _serve_plan(plan_dir, load_plan(plan_dir))
    try:
        client = triton.InferenceServerClient(addresses[plan.tiers[0].name])
        tensor = triton.InferInput(input_name, input_shape, "FP32")
        tensor.set_data_from_numpy(feed[input_name])
        response = client.infer(plan.name, [tensor])
        expected = ort.InferenceSession(str(model_path)).run(None, feed)[0]
        got = response.as_numpy(model.graph.output[0].name)
        assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected)
    finally:
        close()
