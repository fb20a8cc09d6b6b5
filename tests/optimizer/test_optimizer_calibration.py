"""--calibration-data: real input samples (.npz or a directory of .npy) calibrate int8 and feed
the accuracy guard (with a held-out part); bad files give one-line errors and exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from wpk.errors import WpkError
from wpk.optimizer import calibration, pipeline
from wpk.tensor_spec import TensorSpec

IMAGE = TensorSpec("image", (1, 3, 19, 17), "float32")


def _real_images(count, seed=0):
    """Sensor-like data far from the uniform [0, 1) the optimizer would otherwise make up."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, 1.0, (count, 3, 19, 17)) * 40 + 10).astype(np.float32)


def _relative(reference, candidate, feeds):
    r = np.concatenate([reference.run(None, f)[0].ravel() for f in feeds])
    c = np.concatenate([candidate.run(None, f)[0].ravel() for f in feeds])
    return float(np.linalg.norm(r - c) / np.linalg.norm(r))


def test_samples_from_either_layout_and_the_held_out_split(tmp_path):
    per_row = _real_images(20)                              # (N, 3, 19, 17): batch 1 each
    whole = per_row[:, None]                                # (N, 1, 3, 19, 17): whole inputs
    for arrays in ({"image": per_row}, {"image": whole.astype(np.float64), "label": np.ones(20)}):
        samples = calibration.to_samples(arrays, [IMAGE], "data.npz")
        assert len(samples) == 20 and list(samples[0]) == ["image"]
        assert samples[3]["image"].shape == (1, 3, 19, 17)
        assert samples[3]["image"].dtype == np.float32
        np.testing.assert_allclose(samples[3]["image"][0], per_row[3], rtol=1e-6)
    data = calibration.split(samples, "data.npz")
    assert (len(data.calibration), len(data.guard), data.held_out) == (15, 5, True)
    assert all(g is not c for g in data.guard for c in data.calibration)
    small = calibration.split(samples[:4], "data.npz")
    assert (len(small.calibration), len(small.guard), small.held_out) == (4, 4, False)
    # a symbolic batch dimension takes rows too
    symbolic = calibration.to_samples({"x": np.zeros((6, 4), np.int64)},
                                      [TensorSpec.from_ort("x", ["batch", 4], "tensor(int64)")],
                                      "d")
    assert len(symbolic) == 6 and symbolic[0]["x"].shape == (1, 4)


def test_python_api_takes_feeds_or_arrays():
    images = _real_images(3)
    feeds = [{"image": images[i:i + 1].astype(np.float64)} for i in range(3)]
    data = calibration.load(feeds, [IMAGE])
    assert data.source == "calibration feeds" and len(data.calibration) == 3
    assert data.calibration[0]["image"].dtype == np.float32
    assert len(calibration.load({"image": images}, [IMAGE]).guard) == 3
    with pytest.raises(WpkError, match="no value for input 'image'"):
        calibration.load([{"pixels": images[:1]}], [IMAGE])


def test_reads_npz_and_npy_directories(tmp_path):
    images = _real_images(5)
    np.savez(tmp_path / "data.npz", image=images)
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "image.npy", images)
    for path in (tmp_path / "data.npz", tmp_path / "npy"):
        data = calibration.load(path, [IMAGE])
        assert len(data.calibration) == 5 and data.source == str(path)
        np.testing.assert_array_equal(data.calibration[2]["image"][0], images[2])


@pytest.mark.parametrize("arrays,message", [
    ({"other": np.zeros((3, 3, 19, 17), np.float32)}, "no array for input 'image' (arrays: other)"),
    ({"image": np.zeros((3, 3, 19, 16), np.float32)}, "array 'image' has shape [3, 3, 19, 16]"),
    ({"image": np.zeros((3, 19, 17), np.float32)}, "array 'image' has shape [3, 19, 17]"),
    ({"image": np.zeros((3, 3, 19, 17), np.complex64)}, "array 'image' is complex64"),
    ({"image": np.zeros((0, 3, 19, 17), np.float32)}, "no samples"),
])
def test_bad_arrays_name_file_and_tensor(arrays, message, tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(WpkError) as error:
        calibration.load(path, [IMAGE])
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_float_data_for_an_integer_input_is_rejected(tmp_path):
    with pytest.raises(WpkError, match="array 'ids' is float32, input 'ids' is int64"):
        calibration.to_samples({"ids": np.zeros((2, 4), np.float32)},
                               [TensorSpec("ids", (1, 4), "int64")], "ids.npz")


def test_unreadable_files(tmp_path):
    (tmp_path / "junk.npz").write_text("not a zip")
    (tmp_path / "empty").mkdir()
    for path, message in ((tmp_path / "junk.npz", "not an .npz file"),
                          (tmp_path / "missing.npz", "no such file"),
                          (tmp_path / "empty", "no .npy files")):
        with pytest.raises(WpkError, match=message):
            calibration.read_arrays(path)


def test_int8_is_calibrated_on_the_real_data(small_cnn, tmp_path):
    """Random [0, 1) calibration clips data that spans +-100 (about 100 % error); calibrating
    on the file keeps int8 close, measured on held-out samples."""
    images = _real_images(24)
    np.savez(tmp_path / "data.npz", image=images)
    options = pipeline.Options(budget=pipeline.Budget(trials=2), per_operator=False,
                               accuracy_budget=0.1, openvino=False,
                               calibration_data=tmp_path / "data.npz")
    report = pipeline.optimize(small_cnn, tmp_path / "opt", options)
    assert report.calibration == {"source": str(tmp_path / "data.npz"),
                                  "calibration_samples": 18, "guard_samples": 6,
                                  "held_out": True}
    int8 = report.candidates["int8"]
    assert int8["within_budget"] is True and int8["accuracy"][0]["relative"] < 0.1
    assert "held out" in (tmp_path / "opt" / "report.md").read_text()
    reference = ort.InferenceSession(small_cnn.SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    held_out = [{"image": images[i:i + 1]} for i in range(18, 24)]
    random_feeds = [{"image": np.random.default_rng(i).random((1, 3, 19, 17),
                                                                dtype=np.float32)}
                    for i in range(3)]
    errors = {}
    calibrated = [{"image": images[i:i + 1]} for i in range(18)]
    for name, feeds in (("random", random_feeds), ("real", calibrated)):
        work = tmp_path / name
        work.mkdir()
        quantized = pipeline._quantize_int8(small_cnn, feeds, work)
        errors[name] = _relative(reference, ort.InferenceSession(
            str(quantized), providers=["CPUExecutionProvider"]), held_out)
    assert errors["real"] < 0.1 < errors["random"]
    assert abs(errors["real"] - int8["accuracy"][0]["relative"]) < 0.05


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "wpk.optimizer.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=180, cwd=cwd)


@pytest.mark.parametrize("count", [12, 3])
def test_cli_calibration_data(count, small_cnn, tmp_path):
    """12 samples: 3 held out for the guard. 3: none held out, and the CLI says so."""
    model = tmp_path / "small.onnx"
    onnx.save(small_cnn, str(model))
    np.savez(tmp_path / "data.npz", image=_real_images(count))
    result = _cli(model, "-o", tmp_path / "out", "--budget-trials", "2", "--ops", "0",
                  "--no-openvino", "--accuracy-budget", "0.1", "--calibration-data",
                  tmp_path / "data.npz", "--log", tmp_path / "log.jsonl")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["source"] == str(tmp_path / "data.npz")
    assert report["calibration"]["guard_samples"] == 3
    assert report["calibration"]["held_out"] is (count == 12)
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == ([] if count == 12 else [
        "wpk: warning: small: 3 calibration samples (fewer than 8): the accuracy guard "
        "measures int8 on the samples it was calibrated on, none held out"])


@pytest.mark.parametrize("arrays,message", [
    (None, "missing.npz: no such file or directory"),
    ({"pixels": np.zeros((2, 3, 19, 17), np.float32)}, "no array for input 'image'"),
    ({"image": np.zeros((2, 3, 18, 17), np.float32)}, "array 'image' has shape [2, 3, 18, 17]"),
    ({"image": np.zeros((2, 3, 19, 17), np.complex64)}, "array 'image' is complex64"),
])
def test_cli_bad_calibration_data_is_one_line(arrays, message, small_cnn, tmp_path):
    model = tmp_path / "small.onnx"
    onnx.save(small_cnn, str(model))
    path = Path("missing.npz") if arrays is None else Path("data.npz")
    if arrays is not None:
        np.savez(tmp_path / path, **arrays)
    result = _cli(model, "-o", tmp_path / "out", "--calibration-data", path, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _three_tier_plan(model, tmp_path):
    from wpk.partitioner.api import partition
    from wpk.plan import load_plan

    plan_dir = tmp_path / "plan"
    onnx.save(model, str(tmp_path / "small.onnx"))
    pins = {model.graph.node[0].name: "device", model.graph.node[-1].name: "cloud"}
    partition(tmp_path / "small.onnx", ["device", "edge", "cloud"], privacy="none", pins=pins,
              out_dir=plan_dir, use_calibration=False)
    return plan_dir, load_plan(plan_dir)


def test_plan_tiers_get_samples_carried_through_earlier_slices(small_cnn, tmp_path):
    """The file holds the model's inputs; a later tier's samples are what the earlier tiers'
    slices compute from them."""
    from wpk.plan import slice_path

    plan_dir, plan = _three_tier_plan(small_cnn, tmp_path)
    used = [t for t in plan.tiers if t.slice]
    assert len(used) >= 2
    images = _real_images(4)
    np.savez(tmp_path / "data.npz", image=images)
    per_tier = calibration.for_plan(plan, plan_dir, tmp_path / "data.npz")
    assert set(per_tier) == {t.name for t in used}
    first, last = used[0], used[-1]
    np.testing.assert_array_equal(per_tier[first.name][1]["image"][0], images[1])
    # the last tier's inputs, run through its slice, give the whole model's output
    whole = ort.InferenceSession(small_cnn.SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    last_session = ort.InferenceSession(str(slice_path(plan_dir, last)),
                                        providers=["CPUExecutionProvider"])
    out_name = small_cnn.graph.output[0].name
    for i in range(4):
        got = last_session.run([out_name], per_tier[last.name][i])[0]
        np.testing.assert_allclose(got, whole.run(None, {"image": images[i:i + 1]})[0],
                                   rtol=1e-4, atol=1e-4)
    result = _cli(plan_dir, "--tier", last.name, "--budget-trials", "2", "--ops", "0",
                  "--no-openvino", "--calibration-data", tmp_path / "data.npz",
                  "--log", tmp_path / "log.jsonl", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads((plan_dir / "optimized" / last.name / "report.json").read_text())
    assert "through the slices before tier" in report["calibration"]["source"]
    assert report["calibration"]["guard_samples"] == 4


def test_odd_files_are_one_line_errors_naming_file_and_array(tmp_path):
    images = _real_images(3)
    np.save(tmp_path / "image.npy", images)                    # one array, no input name
    np.savez(tmp_path / "objects.npz", image=np.array([object(), object()]))
    (tmp_path / "pickled").mkdir()
    np.save(tmp_path / "pickled" / "image.npy", np.array([object()]), allow_pickle=True)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "image.npy").write_text("not numpy")
    for path, message in (
            (tmp_path / "image.npy", "image.npy: one array, not an .npz of arrays named"),
            (tmp_path / "objects.npz", "objects.npz: array 'image' is not readable as numbers "
                                       "(Object arrays cannot be loaded"),
            (tmp_path / "pickled", "pickled/image.npy: not a readable .npy array (Object "
                                   "arrays cannot be loaded"),
            (tmp_path / "text", "text/image.npy: not a readable .npy array")):
        with pytest.raises(WpkError) as error:
            calibration.read_arrays(path)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_a_directory_ignores_other_files_and_arrays(tmp_path):
    images = _real_images(4)
    np.save(tmp_path / "image.npy", images)
    np.save(tmp_path / "label.npy", np.arange(4))
    (tmp_path / "README.txt").write_text("labels are class ids")
    data = calibration.load(tmp_path, [IMAGE])
    assert len(data.calibration) == 4 and list(data.calibration[0]) == ["image"]


@pytest.mark.parametrize("array,spec,message", [
    (np.array([[0.0, np.nan]], np.float32), ("x", [1, 2], np.float32),
     "array 'x' holds NaN or infinite values (first at index [0, 1])"),
    (np.array([[1.0], [np.inf]]), ("x", [1, 1], np.float32), "first at index [1, 0]"),
    (np.full((1, 2), 1e300), ("x", [1, 2], np.float32), "NaN or infinite"),  # float32 overflow
    (np.array([[1, 2 ** 40]]), ("ids", [1, 2], np.int32),
     "array 'ids' holds values in [1, 1099511627776], beyond the range of input 'ids' (int32)"),
    (np.array([[-1, 3]]), ("ids", [1, 2], np.uint8), "holds values in [-1, 3]"),
])
def test_values_a_cast_would_change_are_refused(array, spec, message):
    """NaN poisons int8 ranges and makes every candidate's accuracy NaN (all rejected, the
    default shipped without a word); out-of-range integers wrap around silently."""
    spec = TensorSpec.of(*spec)
    with pytest.raises(WpkError) as error:
        calibration.to_samples({spec.name: array}, [spec], "d.npz")
    assert str(error.value).startswith("d.npz: ") and message in str(error.value)
    with pytest.raises(WpkError, match="sample 0"):
        calibration.load([{spec.name: array}], [spec])


def test_integers_cast_across_signedness_when_they_fit():
    samples = calibration.to_samples({"ids": np.array([[1, 255]])},
                                     [TensorSpec("ids", (1, 2), "uint8")], "d.npz")
    assert samples[0]["ids"].dtype == np.uint8 and samples[0]["ids"].tolist() == [[1, 255]]
    with pytest.raises(WpkError, match="calibration feeds \\(sample 0\\): array 'ids' is "
                                       "float32, input 'ids' is int64"):
        calibration.load([{"ids": np.zeros((1, 4), np.float32)}],
                         [TensorSpec("ids", (1, 4), "int64")])


def test_plan_slices_that_do_not_fit_the_data_name_the_tier(small_cnn, tmp_path):
    from onnx import TensorProto, helper

    from wpk.plan import slice_path

    plan_dir, plan = _three_tier_plan(small_cnn, tmp_path)
    used = [t for t in plan.tiers if t.slice]
    first, last = used[0], used[-1]
    np.savez(tmp_path / "data.npz", image=_real_images(2))
    slice_path(plan_dir, last).write_text("junk")
    # only the slices up to the tiers asked for run: the broken last one is not even read
    assert set(calibration.for_plan(plan, plan_dir, tmp_path / "data.npz",
                                    tiers=[first.name])) == {first.name}
    with pytest.raises(WpkError, match=f"ONNX Runtime cannot load the slice of tier "
                                       f"'{last.name}'"):
        calibration.for_plan(plan, plan_dir, tmp_path / "data.npz")
    # a slice whose input neither the file nor an earlier slice provides
    graph = helper.make_graph(
        [helper.make_node("Relu", ["foo"], ["bar"])], "other",
        [helper.make_tensor_value_info("foo", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("bar", TensorProto.FLOAT, [1, 8])])
    other = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    other.ir_version = 9
    onnx.save(other, str(slice_path(plan_dir, last)))
    with pytest.raises(WpkError) as error:
        calibration.for_plan(plan, plan_dir, tmp_path / "data.npz")
    assert str(error.value) == (f"{tmp_path / 'data.npz'}: tier '{last.name}' takes 'foo', "
                                f"which neither this file (arrays: image) nor an earlier "
                                f"tier's slice provides")
    result = _cli(plan_dir, "--tier", last.name, "--calibration-data", tmp_path / "data.npz")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"wpk: error: {error.value}"


def test_cli_odd_inputs_are_one_line(small_cnn, tmp_path):
    model = tmp_path / "small.onnx"
    onnx.save(small_cnn, str(model))
    (tmp_path / "broken.onnx").write_text("junk")
    images = _real_images(3)
    images[2, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", image=images)
    np.save(tmp_path / "image.npy", images)
    for target, data, message in (
            ("broken.onnx", "nan.npz", "broken.onnx: ONNX Runtime cannot load this model"),
            ("small.onnx", "nan.npz", "nan.npz: array 'image' holds NaN or infinite values "
                                      "(first at index [2, 0, 0, 0])"),
            ("small.onnx", "image.npy", "image.npy: one array, not an .npz")):
        result = _cli(target, "-o", "out", "--calibration-data", data, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"wpk: error: {message}")
        assert len(result.stderr.strip().splitlines()) == 1


def test_wpk_optimize_and_wpk_prune_describe_the_calibration_files_alike():
    """Both commands take the files `calibration` reads, and say so in the same words; each
    one's --help is its module docstring (first line, then the usage examples)."""
    from wpk.optimizer import cli, prune_cli

    for module, parser in ((cli, cli._parser()), (prune_cli, prune_cli._parser())):
        text = " ".join(parser.format_help().split())
        assert " ".join(calibration.DATA_FILES_HELP.split()) in text
        assert parser.description == module.__doc__.splitlines()[0]
        assert " ".join(module.__doc__.splitlines()[2].split()) in text
