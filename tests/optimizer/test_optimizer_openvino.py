"""OpenVINO's CPU plugin as a candidate: an OpenVINO slice matches ONNX Runtime, loads through
wpk.optimizer.load and the runtime's load_runner, and falls back to ONNX Runtime (with a
warning) where openvino is not installed. Tests that need openvino skip cleanly without it."""
import importlib.util
import os
import sys
import threading
from warnings import catch_warnings

import numpy as np
import onnxruntime as ort
import pytest

import wpk.optimizer
from wpk.optimizer import openvino_backend, pipeline

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino is not installed (pip install "
                                           "'wpk[openvino]')")


def _feed(seed=0):
    return {"image": np.random.default_rng(seed).random((1, 3, 19, 17), dtype=np.float32)}


def _expected(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


@pytest.fixture
def without_openvino(monkeypatch):
    """This process as if openvino were not installed (an import of it raises ImportError)."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr(openvino_backend, "_warned", set())


@needs_openvino
def test_openvino_slice_matches_onnx_runtime(small_cnn, tmp_path):
    pipeline.save_openvino(small_cnn, tmp_path / "ov", threads=2)
    session = wpk.optimizer.load(tmp_path / "ov")
    assert session.get_providers() == [openvino_backend.PROVIDER]
    assert session.segments[0].actual_precision == "f32"     # forced, never bf16 silently
    assert [i.name for i in session.get_inputs()] == ["image"]
    out_name = session.get_outputs()[0].name
    for seed in range(3):
        got = session.run([out_name], _feed(seed))[0]
        np.testing.assert_allclose(got, _expected(small_cnn, _feed(seed)), rtol=1e-4, atol=1e-5)
    # ONNX Runtime sessions may be called from several threads: so may this one
    results = {}

    def call(seed):
        results[seed] = session.run(None, _feed(seed))[0]

    threads = [threading.Thread(target=call, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, got in results.items():
        np.testing.assert_allclose(got, _expected(small_cnn, _feed(seed)), rtol=1e-4, atol=1e-5)


def test_without_openvino_the_slice_falls_back_to_onnx_runtime(small_cnn, tmp_path,
                                                               without_openvino):
    pipeline.save_openvino(small_cnn, tmp_path / "ov")
    with pytest.warns(openvino_backend.OpenVinoWarning, match="ONNX Runtime instead"):
        session = wpk.optimizer.load(tmp_path / "ov")
    assert session.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_allclose(session.run(None, _feed())[0], _expected(small_cnn, _feed()),
                               rtol=1e-5, atol=1e-6)


def _plan_with_optimized_tier(model, tmp_path, optimized):
    import onnx

    from wpk.plan import Plan, TierPlan

    onnx.save(model, str(tmp_path / "edge.onnx"))
    out_name = model.graph.output[0].name
    tier = TierPlan(name="edge", slice="edge.onnx", nodes=[], inputs=["image"],
                    outputs=[out_name], slice_inputs=["image"], slice_outputs=[out_name],
                    forward=[], results=[out_name], passthrough=[], predicted_compute_ms=1.0,
                    optimized=optimized)
    plan = Plan(model={"name": "small"}, objective={}, tiers=[tier], links=[], predicted={})
    plan.save(tmp_path)
    return tier


@pytest.mark.parametrize("installed", [
    pytest.param(True, marks=needs_openvino), False])
def test_runtime_load_runner_serves_an_openvino_tier(installed, small_cnn, tmp_path,
                                                     monkeypatch):
    from wpk.runtime.slice import load_runner

    pipeline.save_openvino(small_cnn, tmp_path / "optimized" / "edge")
    tier = _plan_with_optimized_tier(small_cnn, tmp_path, "optimized/edge")
    if not installed:
        monkeypatch.setitem(sys.modules, "openvino", None)
        monkeypatch.setattr(openvino_backend, "_warned", set())
        with pytest.warns(openvino_backend.OpenVinoWarning):
            runner = load_runner(tmp_path, tier)
    else:
        runner = load_runner(tmp_path, tier)
    assert runner.get_providers() == ([openvino_backend.PROVIDER] if installed
                                      else ["CPUExecutionProvider"])
    got = runner.run([small_cnn.graph.output[0].name], _feed(5))[0]
    np.testing.assert_allclose(got, _expected(small_cnn, _feed(5)), rtol=1e-4, atol=1e-5)


@needs_openvino
def test_optimizer_measures_openvino_and_keeps_lossy_variants_to_the_budget(small_cnn,
                                                                            tmp_path):
    options = pipeline.Options(budget=pipeline.Budget(trials=4), per_operator=False,
                               accuracy_budget=1e-7, samples=2)
    report = pipeline.optimize(small_cnn, tmp_path / "opt", options)
    fp32 = report.candidates["openvino"]
    assert fp32["precision"] == "fp32" and fp32["within_budget"] is True
    assert fp32["ms"] > 0 and fp32["default_ms"] > 0
    assert max(a["relative"] for a in fp32["accuracy"]) < 1e-4
    lossy = [k for k in ("openvino-bf16", "openvino-fp16", "openvino-int8")
             if "within_budget" in report.candidates.get(k, {})]
    assert lossy, report.candidates
    assert all(report.candidates[k]["within_budget"] is False for k in lossy)
    assert report.chosen in ("default", "tuned", "offline", "openvino")
    chosen = wpk.optimizer.load(tmp_path / "opt")
    assert chosen.precision == "fp32"
    assert "openvino" in (tmp_path / "opt" / "report.md").read_text()
    # without an accuracy budget only the fp32 variant is a candidate
    plain = pipeline.optimize(small_cnn, tmp_path / "plain", pipeline.Options(
        budget=pipeline.Budget(trials=2), per_operator=False, samples=1))
    assert "openvino" in plain.candidates
    assert not any(k.startswith("openvino-") for k in plain.candidates)


def test_optimizer_without_openvino_says_so_and_skips_it(small_cnn, tmp_path,
                                                         without_openvino):
    options = pipeline.Options(budget=pipeline.Budget(trials=2), per_operator=False, samples=1)
    with pytest.warns(openvino_backend.OpenVinoWarning, match="not installed"):
        report = pipeline.optimize(small_cnn, tmp_path / "opt", options)
    assert "not installed" in report.candidates["openvino"]["skipped"]
    assert report.chosen != "openvino"
    assert "skipped" in (tmp_path / "opt" / "report.md").read_text()
    disabled = pipeline.optimize(small_cnn, tmp_path / "off", pipeline.Options(
        budget=pipeline.Budget(trials=2), per_operator=False, samples=1, openvino=False))
    assert "openvino" not in disabled.candidates


@needs_openvino
def test_tier_server_serves_an_openvino_slice_over_grpc(small_cnn, tmp_path):
    """The runtime's gRPC tier server, unchanged, answers from a slice OpenVINO runs."""
    triton = pytest.importorskip("tritonclient.grpc")
    from wpk.plan import load_plan

    from ..conftest import openvino_plan
    from .test_optimizer_runtime_serving import _serve_plan

    plan_dir = openvino_plan(small_cnn, tmp_path)
    plan = load_plan(plan_dir)
    addresses, close = _serve_plan(plan_dir, plan)
    try:
        client = triton.InferenceServerClient(addresses["edge"])
        tensor = triton.InferInput("image", [1, 3, 19, 17], "FP32")
        tensor.set_data_from_numpy(_feed(9)["image"])
        response = client.infer(plan.name, [tensor])
        np.testing.assert_allclose(response.as_numpy(small_cnn.graph.output[0].name),
                                   _expected(small_cnn, _feed(9)), rtol=1e-4, atol=1e-5)
    finally:
        close()


def test_cli_without_openvino_warns_once_in_one_line(small_cnn, tmp_path):
    """Two tiers' worth of work in one process, openvino unimportable: one warning line."""
    import subprocess

    import onnx

    onnx.save(small_cnn, str(tmp_path / "small.onnx"))
    code = ("import sys; sys.modules['openvino'] = None\n"
            "from wpk.optimizer.cli import main\n"
            "for out in ('a', 'b'):\n"
            "    assert main([sys.argv[1], '-o', out, '--budget-trials', '2', '--ops', '0',\n"
            "                 '--log', 'log.jsonl']) == 0\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "small.onnx")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == ["wpk: warning: OpenVINO candidates skipped: openvino is not installed "
                        "(pip install 'wpk[openvino]')"]
    assert "Traceback" not in result.stderr


def _three_output_model():
    """x -> MatMul a, Relu(a) b, Neg(x) c: outputs to pick in any order."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 10, "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Neg", ["x"], ["c"])]
    graph = helper.make_graph(
        nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abc"], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@needs_openvino
def test_openvino_run_honours_output_names_and_returns_fresh_arrays(tmp_path):
    model = _three_output_model()
    pipeline.save_openvino(model, tmp_path / "ov")
    session = wpk.optimizer.load(tmp_path / "ov")
    assert session.get_providers() == [openvino_backend.PROVIDER]
    reference = ort.InferenceSession(model.SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    x = {"x": np.random.default_rng(1).random((2, 4), dtype=np.float32) - 0.5}
    for names in (None, [], ["c", "a"], ["b"], ["a", "a"]):
        got, want = session.run(names, x), reference.run(names, x)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # the arrays of one call are not overwritten by the next, nor do they alias the feed
    first = session.run(None, x)
    kept = [a.copy() for a in first]
    second = session.run(None, {"x": np.full((2, 4), 7.0, np.float32)})
    for a, k, b in zip(first, kept, second):
        np.testing.assert_array_equal(a, k)
        assert not np.shares_memory(a, b) and not np.shares_memory(a, x["x"])


@needs_openvino
@pytest.mark.parametrize("feeds,message", [
    ({"x": np.zeros((2, 4))}, "input 'x' is float64, the model takes float32"),
    ({"x": np.zeros((2, 4), np.int64)}, "input 'x' is int64, the model takes float32"),
    ({"x": np.zeros((3, 4), np.float32)}, "input 'x' has shape [3, 4], the model takes [2, 4]"),
    ({"x": np.zeros((2, 4, 1), np.float32)}, "has shape [2, 4, 1]"),
    ({}, "input 'x' is missing from the feeds"),
    ({"x": np.zeros((2, 4), np.float32), "z": np.zeros(1)}, "has no input 'z' (inputs: x)"),
])
def test_openvino_run_refuses_feeds_as_onnx_runtime_does(feeds, message, tmp_path):
    """OpenVINO alone would cast float64 silently and, for a missing input, rerun the tensor
    of the previous call: both would be wrong answers, not errors."""
    from wpk.errors import WpkError

    pipeline.save_openvino(_three_output_model(), tmp_path / "ov")
    session = wpk.optimizer.load(tmp_path / "ov")
    session.run(None, {"x": np.ones((2, 4), np.float32)})      # a previous input to reuse
    with pytest.raises(WpkError) as error:
        session.run(None, feeds)
    assert message in str(error.value)
    with pytest.raises(WpkError, match="has no output 'nope' \\(outputs: a, b, c\\)"):
        session.run(["nope"], {"x": np.ones((2, 4), np.float32)})


@needs_openvino
def test_openvino_threads_each_get_their_own_request(small_cnn, tmp_path):
    pipeline.save_openvino(small_cnn, tmp_path / "ov", threads=1)
    session = wpk.optimizer.load(tmp_path / "ov")
    expected = {seed: _expected(small_cnn, _feed(seed)) for seed in range(4)}
    failures = []

    def call(seed):
        for _ in range(25):
            got = session.run(None, _feed(seed))[0]
            if not np.allclose(got, expected[seed], rtol=1e-4, atol=1e-5):
                failures.append(seed)

    threads = [threading.Thread(target=call, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_broken_openvino_directory_is_a_one_line_error(damage, small_cnn, tmp_path):
    """No misleading 'serving it with ONNX Runtime instead' warning, no ORT traceback."""
    from wpk.errors import WpkError

    pipeline.save_openvino(small_cnn, tmp_path / "ov")
    model = tmp_path / "ov" / "model.onnx"
    if damage == "missing":
        model.unlink()
    else:
        model.write_text("junk")
    with catch_warnings(record=True) as caught, pytest.raises(WpkError) as error:
        wpk.optimizer.load(tmp_path / "ov")
    assert str(error.value).startswith(str(model))
    assert ("missing" if damage == "missing" else "nor ONNX Runtime") in str(error.value)
    assert "\n" not in str(error.value)
    assert not [w for w in caught if issubclass(w.category, openvino_backend.OpenVinoWarning)]


def test_fallback_gives_exactly_onnx_runtime_outputs(small_cnn, tmp_path):
    """openvino unimportable in a fresh process: the OpenVINO directory serves ORT's own
    outputs, bit for bit, with one warning and no traceback."""
    import subprocess

    pipeline.save_openvino(small_cnn, tmp_path / "ov")
    np.save(tmp_path / "x.npy", _feed(3)["image"])
    code = ("import sys, numpy as np; sys.modules['openvino'] = None\n"
            "import wpk.optimizer\n"
            "s = wpk.optimizer.load(sys.argv[1])\n"
            "assert s.get_providers() == ['CPUExecutionProvider'], s.get_providers()\n"
            "np.save(sys.argv[2], s.run(None, {'image': np.load(sys.argv[3])})[0])\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ov"),
                             str(tmp_path / "y.npy"), str(tmp_path / "x.npy")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "ONNX Runtime instead" in result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), _expected(small_cnn, _feed(3)))


def _inverse_model():
    """com.microsoft.Inverse: ONNX Runtime runs it, OpenVINO has no conversion for it."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Inverse", ["x"], ["y"], domain="com.microsoft")], "inverse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


@needs_openvino
def test_a_graph_openvino_cannot_convert_is_reported_in_one_readable_line(tmp_path,
                                                                           monkeypatch):
    model = _inverse_model()
    report = pipeline.optimize(model, tmp_path / "opt", pipeline.Options(
        budget=pipeline.Budget(trials=1), per_operator=False, samples=1))
    assert report.candidates["openvino"]["error"] == (
        "OpConversionFailure: No conversion rule found for operations: com.microsoft.Inverse")
    # a directory that asks for OpenVINO anyway is served by ONNX Runtime, saying why
    pipeline.save_openvino(model, tmp_path / "ov")
    monkeypatch.setattr(openvino_backend, "_warned", set())
    with pytest.warns(openvino_backend.OpenVinoWarning,
                      match="No conversion rule found .*; serving it with ONNX Runtime"):
        session = wpk.optimizer.load(tmp_path / "ov")
    x = np.array([[[2, 0, 0], [0, 4, 0], [0, 0, 8]]], np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], np.linalg.inv(x), rtol=1e-6)
