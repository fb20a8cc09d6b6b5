"""Graph passes, the optimized slice and its executor, the CLI on models and plans."""
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import wpk.optimizer
from wpk.optimizer import passes, pipeline
from wpk.optimizer.kernels import load_initializers
from wpk.optimizer.selection import heavy_specs


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feed(seed=0):
    return {"image": np.random.default_rng(seed).random((1, 3, 19, 17), dtype=np.float32)}


def test_passes_fold_batchnorm_and_keep_outputs(small_cnn):
    folded, log = passes.run_passes(small_cnn)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert any("fold-batchnorm" in line for line in log)
    fused = passes.fuse_conv_relu(folded)
    assert any(n.op_type == "FusedConv" for n in fused.graph.node)
    expected = _session(small_cnn).run(None, _feed())[0]
    for model in (folded, fused):
        np.testing.assert_allclose(_session(model).run(None, _feed())[0], expected,
                                   rtol=1e-4, atol=1e-5)


def test_constant_folding_and_dead_nodes():
    from onnx import TensorProto, helper, numpy_helper

    two = numpy_helper.from_array(np.full((3,), 2.0, np.float32), "two")
    nodes = [helper.make_node("Mul", ["two", "two"], ["four"]),          # constant
             helper.make_node("Add", ["x", "four"], ["y"]),
             helper.make_node("Identity", ["y"], ["y_id"]),
             helper.make_node("Neg", ["x"], ["unused"])]                   # dead
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y_id", TensorProto.FLOAT, [3])], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    out, _ = passes.run_passes(model)
    assert [n.op_type for n in out.graph.node] == ["Add", "Identity"]
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(_session(out).run(None, {"x": x})[0], x + 4)


def test_ort_offline_optimization_is_saved(small_cnn, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(small_cnn, str(src))
    out = passes.ort_offline_optimize(src, tmp_path / "m.ort.onnx", "all")
    assert out.exists() and onnx.load(str(out)).graph.node


def test_segmented_slice_with_generated_kernels_matches_original(small_cnn, tmp_path):
    """Every covered operator replaced by a generated kernel, run by the segment executor."""
    model, _ = passes.run_passes(small_cnn)
    specs = heavy_specs(model, load_initializers(model), limit=20)
    assert {s.op for s in specs} >= {"conv2d", "gemm", "pool2d", "global_avg_pool"}
    assert any(s.params.get("group", 1) > 1 for s in specs)      # the depthwise conv
    pipeline.save_segmented(model, specs, tmp_path / "mixed")
    session = wpk.optimizer.load(tmp_path / "mixed")
    manifest = json.loads((tmp_path / "mixed" / "optimized.json").read_text())
    assert sum(s["type"] == "kernel" for s in manifest["segments"]) == len(specs)
    assert "wpk.generated-c" in session.get_providers()
    for seed in range(2):
        expected = _session(small_cnn).run(None, _feed(seed))[0]
        got = session.run(None, _feed(seed))[0]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert [i.name for i in session.get_inputs()] == ["image"]


def test_optimize_gives_original_outputs_and_a_report(small_cnn, tmp_path):
    options = pipeline.Options(budget=pipeline.Budget(trials=8), operator_limit=2,
                               log_path=str(tmp_path / "log.jsonl"), samples=2)
    report = pipeline.optimize(small_cnn, tmp_path / "opt", options, name="small")
    assert report.chosen in report.candidates and report.speedup >= 1.0
    assert report.session_search["measured"] >= 1 and len(report.operators) == 2
    assert all(a["relative"] < 1e-4 for a in report.accuracy)
    session = wpk.optimizer.load(tmp_path / "opt")
    expected = _session(small_cnn).run(None, _feed(3))
    got = session.run([session.get_outputs()[0].name], _feed(3))
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=1e-5)
    saved = json.loads((tmp_path / "opt" / "report.json").read_text())
    assert saved["chosen"] == report.chosen
    assert report.candidate_kind == _kind_of(report.chosen) == session.candidate_kind
    assert report.chosen in (tmp_path / "opt" / "report.md").read_text()
    # a second run starts from every measurement of the first (tuning log) and goes further
    again = pipeline.optimize(small_cnn, tmp_path / "opt2", options, name="small")
    first = report.session_search
    assert again.session_search["reused"] >= first["measured"]
    assert again.session_search["best_ms"] <= first["best_ms"]
    assert sum(op["reused"] for op in again.operators) >= \
        sum(op["measured"] for op in report.operators if op["kernel_ms"] != float("inf"))


def _kind_of(chosen: str) -> str:
    """The candidate kind that adds each candidate key."""
    if chosen.startswith("openvino"):
        return "openvino"
    return {"default": "onnxruntime", "tuned": "onnxruntime", "offline": "onnxruntime",
            "int8": "int8", "custom-ops": "custom-ops", "mixed": "segments"}[chosen]


def test_the_manifest_names_the_candidate_kind_and_old_manifests_still_load(small_cnn,
                                                                            tmp_path):
    from wpk.optimizer.session import DEFAULT_SESSION

    io = pipeline._SliceIO("small", "here", *pipeline._io(small_cnn))
    tuned = pipeline._write_single(tmp_path / "tuned", io, small_cnn, dict(DEFAULT_SESSION),
                                   "fp32", offline=False)
    out = tmp_path / "out"
    out.mkdir()
    pipeline._install(tuned, out, "tuned", "onnxruntime")
    manifest = json.loads((out / "optimized.json").read_text())
    assert manifest["chosen"] == "tuned" and manifest["candidate_kind"] == "onnxruntime"
    assert wpk.optimizer.load(out).candidate_kind == "onnxruntime"
    del manifest["candidate_kind"]   # as written before manifests named the kind
    (out / "optimized.json").write_text(json.dumps(manifest))
    old = wpk.optimizer.load(out)
    assert old.candidate_kind is None
    expected = _session(small_cnn).run(None, _feed())[0]
    np.testing.assert_allclose(old.run(None, _feed())[0], expected, rtol=1e-5, atol=1e-6)


def test_the_kind_names_manifests_store_stay_the_same():
    assert list(pipeline.CANDIDATE_KINDS) == ["onnxruntime", "int8", "openvino", "custom-ops",
                                              "segments"]
    assert all(callable(add) for add in pipeline.CANDIDATE_KINDS.values())


def test_int8_only_within_the_accuracy_budget(small_cnn, tmp_path):
    strict = pipeline.Options(budget=pipeline.Budget(trials=4), per_operator=False,
                              accuracy_budget=1e-7, samples=2)
    report = pipeline.optimize(small_cnn, tmp_path / "strict", strict)
    assert report.candidates["int8"]["within_budget"] is False
    assert report.chosen != "int8"
    assert wpk.optimizer.load(tmp_path / "strict").precision == "fp32"


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "wpk.optimizer.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_on_a_model_file(small_cnn, tmp_path):
    path = tmp_path / "small.onnx"
    onnx.save(small_cnn, str(path))
    result = _run_cli(str(path), "-o", str(tmp_path / "out"), "--budget-trials", "4",
                      "--ops", "1", "--log", str(tmp_path / "log.jsonl"), "-q")
    assert result.returncode == 0, result.stderr
    assert "small:" in result.stdout and (tmp_path / "out" / "optimized.json").exists()


def test_cli_on_a_model_whose_nodes_have_no_names(small_cnn, tmp_path):
    """Legal ONNX that many exporters write: every pass must find nodes by wpk's names."""
    unnamed = onnx.ModelProto()
    unnamed.CopyFrom(small_cnn)
    for node in unnamed.graph.node:
        node.name = ""
    path = tmp_path / "unnamed.onnx"
    onnx.save(unnamed, str(path))
    result = _run_cli(str(path), "-o", str(tmp_path / "out"), "--budget-trials", "4",
                      "--ops", "2", "-q")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    session = wpk.optimizer.load(tmp_path / "out")
    expected = _session(small_cnn).run(None, _feed(4))
    got = session.run([session.get_outputs()[0].name], _feed(4))
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-3, atol=1e-4)


def test_cli_on_a_plan_sets_the_tier_optimized_field(small_cnn, tmp_path):
    from wpk.plan import Plan, TierPlan, load_plan

    onnx.save(small_cnn, str(tmp_path / "edge.onnx"))
    out_name = small_cnn.graph.output[0].name
    tier = TierPlan(name="edge", slice="edge.onnx", nodes=[], inputs=["image"],
                    outputs=[out_name], slice_inputs=["image"], slice_outputs=[out_name],
                    forward=[], results=[out_name], passthrough=[], predicted_compute_ms=1.0)
    Plan(model={"name": "small"}, objective={}, tiers=[tier], links=[], predicted={}
         ).save(tmp_path)
    result = _run_cli(str(tmp_path), "--tier", "edge", "--budget-trials", "4", "--ops", "0",
                      "--log", str(tmp_path / "log.jsonl"), "-q")
    assert result.returncode == 0, result.stderr
    plan = load_plan(tmp_path)
    assert plan.tier("edge").optimized == "optimized/edge"
    session = wpk.optimizer.load(tmp_path / plan.tier("edge").optimized)
    assert session.run(None, _feed())[0].shape == (1, 5)


def test_the_flags_are_read_once_into_an_optimize_job(small_cnn, tmp_path):
    from wpk.optimizer.cli import OptimizeJob, Target, _parser

    path = tmp_path / "small.onnx"
    onnx.save(small_cnn, str(path))
    args = _parser().parse_args([str(path), "-o", str(tmp_path / "out"), "--ops", "0",
                                 "--no-openvino", "--budget-trials", "5",
                                 "--accuracy-budget", "0.02", "--input-shape", "image=1x3x19x17",
                                 "--log", str(tmp_path / "log.jsonl"), "-q"])
    job = OptimizeJob.from_args(args)
    assert job.targets == [Target("small", path, tmp_path / "out", None)]
    assert not job.from_plan and job.quiet and job.input_shapes == {"image": (1, 3, 19, 17)}
    options = job.options
    assert (options.per_operator, options.openvino, options.winograd) == (False, False, True)
    assert options.budget == pipeline.Budget(5, None) and options.accuracy_budget == 0.02
    assert options.log_path == str(tmp_path / "log.jsonl")


@pytest.mark.parametrize("args,message", [
    (["missing.onnx", "-o", "x"], "no such file"),
    (["{plan}", "--tier", "cloud"], "no tier 'cloud'"),
    (["{plan}"], "--tier"),
    (["{plan}", "--tier", "edge", "--all-local"], "one or the other"),
    (["{plan}", "--tier", "edge", "--log", "{plan}"], "is a directory"),
    (["{plan}", "--tier", "edge", "--log", "{plan}/edge.onnx"], "not UTF-8"),
    (["{plan}", "--tier", "edge", "-o", "elsewhere"], "-o/--output is for a model file"),
    # a directory of other files is never an output: installing would delete them
    (["{plan}/edge.onnx", "-o", "{plan}"], "holds other files (no optimized.json)"),
])
def test_cli_bad_input_is_one_line(args, message, small_cnn, tmp_path):
    from wpk.plan import Plan, TierPlan

    onnx.save(small_cnn, str(tmp_path / "edge.onnx"))
    tier = TierPlan("edge", "edge.onnx", [], [], [], [], [], [], [], [], 1.0)
    Plan({"name": "m"}, {}, [tier], [], {}).save(tmp_path)
    args = [a.replace("{plan}", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, "-m", "wpk.optimizer.cli", *args],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "edge.onnx").exists() and (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--samples", "0"], "argument --samples: 0 must be at least 1"),
    (["--budget-seconds", "-1"], "argument --budget-seconds: -1 must be more than 0"),
    (["--seed", "-1"], "argument --seed: -1 must be 0 or more"),
    (["--ops", "x"], "argument --ops: 'x' is not an integer"),
])
def test_cli_refuses_bad_numbers_before_any_work(args, message, tmp_path):
    result = _run_cli(str(tmp_path), "--tier", "edge", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_all_local_keeps_the_tiers_it_finished_when_a_later_one_fails(small_cnn, tmp_path):
    from wpk.plan import Plan, TierPlan, load_plan

    onnx.save(small_cnn, str(tmp_path / "device.onnx"))
    (tmp_path / "edge.onnx").write_bytes(b"not an onnx model")
    out_name = small_cnn.graph.output[0].name
    tiers = [TierPlan(name=name, slice=f"{name}.onnx", nodes=[], inputs=["image"],
                      outputs=[out_name], slice_inputs=["image"], slice_outputs=[out_name],
                      forward=[], results=[out_name], passthrough=[], predicted_compute_ms=1.0)
             for name in ("device", "edge")]
    Plan(model={"name": "small"}, objective={}, tiers=tiers, links=[], predicted={}
         ).save(tmp_path)
    result = _run_cli(str(tmp_path), "--all-local", "--budget-trials", "2", "--ops", "0",
                      "--no-openvino", "--log", str(tmp_path / "log.jsonl"), "-q")
    assert result.returncode == 2 and "edge" in result.stderr, result.stderr
    plan = load_plan(tmp_path)
    assert plan.tier("device").optimized == "optimized/device"
    assert plan.tier("edge").optimized is None
    assert wpk.optimizer.load(tmp_path / "optimized/device").run(None, _feed())[0].shape == \
        (1, 5)


def test_load_rejects_a_directory_without_manifest(tmp_path):
    from wpk.errors import WpkError

    with pytest.raises(WpkError, match="optimized.json"):
        wpk.optimizer.load(tmp_path)


def test_zero_time_budget_still_writes_a_working_slice(small_cnn, tmp_path):
    options = pipeline.Options(budget=pipeline.Budget(trials=50, seconds=0.0), samples=1)
    report = pipeline.optimize(small_cnn, tmp_path / "opt", options)
    assert report.session_search["measured"] == 0 and report.chosen in report.candidates
    assert wpk.optimizer.load(tmp_path / "opt").candidate_kind == _kind_of(report.chosen)
    got = wpk.optimizer.load(tmp_path / "opt").run(None, _feed())[0]
    np.testing.assert_allclose(got, _session(small_cnn).run(None, _feed())[0], rtol=1e-4,
                               atol=1e-5)


def test_the_per_operator_table_shows_a_fused_sites_first_node_and_its_size():
    from wpk.optimizer.cli import short_node_name

    fused = "+".join(f"/features/features.5/block/block.{i}/block.{i}.0/Conv_output_0_nchwc"
                     for i in range(4))
    shown = short_node_name(fused)
    assert len(shown) < 60 and shown.endswith("block.0.0/Conv_output_0_nchwc (+3)")
    assert short_node_name("/layer1/Conv") == "/layer1/Conv"


def _two_input_model():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "ids_f"], ["y"])]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_optimized_session_inputs_and_outputs_are_tensor_specs(tmp_path):
    from wpk.optimizer.session import DEFAULT_SESSION
    from wpk.tensor_spec import TensorSpec

    model = _two_input_model()
    io = pipeline._SliceIO("two", "here", *pipeline._io(model))
    pipeline._write_single(tmp_path / "opt", io, model, dict(DEFAULT_SESSION), "fp32",
                           offline=False)
    session = wpk.optimizer.load(tmp_path / "opt")
    inputs, outputs = session.get_inputs(), session.get_outputs()
    assert inputs == [TensorSpec("x", (-1, 4), "float32"), TensorSpec("ids", (-1, 4), "int64")]
    assert outputs == [TensorSpec("y", (-1, 4), "float32")]
    assert all(isinstance(t, TensorSpec) for t in inputs + outputs)
    # ORT's NodeArg face: the same names and type texts as ONNX Runtime's own session
    plain = _session(model)
    assert [(i.name, i.type) for i in inputs] == [(i.name, i.type) for i in plain.get_inputs()]
    feeds = {"x": np.ones((2, 4), np.float32), "ids": np.arange(8).reshape(2, 4)}
    np.testing.assert_array_equal(session.run(None, feeds)[0], plain.run(None, feeds)[0])


def test_manifest_tensors_in_the_old_form_still_load(tmp_path):
    """optimized.json keeps ONNX Runtime's NodeArg fields as they always were: shapes with
    dimension names and None, type text, and (earliest manifests) no type for float."""
    from wpk.optimizer.executor import tensor_specs
    from wpk.optimizer.session import DEFAULT_SESSION
    from wpk.tensor_spec import TensorSpec

    old = [{"name": "x", "shape": ["batch", 4], "type": "tensor(float)"},
           {"name": "ids", "shape": [None, 4], "type": "tensor(int64)"},
           {"name": "z", "shape": [1, 3]}]
    assert tensor_specs(old) == [TensorSpec("x", (-1, 4), "float32"),
                                 TensorSpec("ids", (-1, 4), "int64"),
                                 TensorSpec("z", (1, 3), "float32")]
    model = _two_input_model()
    io = pipeline._SliceIO("two", "here", *pipeline._io(model))
    directory = pipeline._write_single(tmp_path / "opt", io, model, dict(DEFAULT_SESSION),
                                       "fp32", offline=False)
    manifest = json.loads((directory / "optimized.json").read_text())
    assert manifest["inputs"] == old[:2]          # the format on disk is unchanged
    manifest["outputs"] = [{"name": "y", "shape": ["batch", 4]}]   # no type: float
    (directory / "optimized.json").write_text(json.dumps(manifest))
    assert wpk.optimizer.load(directory).get_outputs() == [TensorSpec("y", (-1, 4), "float32")]
