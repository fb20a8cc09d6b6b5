"""wpk-prune: the patterns hold exactly, the right layers are skipped, the report measures
what it says (and claims no accuracy it did not measure), bad input is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from wpk.errors import WpkError
from wpk.optimizer import prune as pruning
from wpk.optimizer.sparsity import weight_sites

from .sparse_models import small_net, weights

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "wpk.optimizer.prune_cli", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(small_net(), str(path))
    return path


def _matrix(model: onnx.ModelProto, node: str) -> np.ndarray:
    site = next(s for s in weight_sites(model) if s.node == node)
    return site.matrix(weights(model)[site.weight])


# --- the masks ----------------------------------------------------------------------------

@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8)])
def test_nm_mask_keeps_the_n_largest_of_every_m(n, m):
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((12, 64)).astype(np.float32)
    mask = pruning.nm_mask(matrix, n, m)
    groups = mask.reshape(12, -1, m)
    assert (groups.sum(axis=-1) == n).all()
    magnitudes = np.abs(matrix).reshape(12, -1, m)
    kept_min = np.where(groups, magnitudes, np.inf).min(axis=-1)
    dropped_max = np.where(groups, -np.inf, magnitudes).max(axis=-1)
    assert (kept_min >= dropped_max).all()


def test_tile_mask_prunes_whole_columns_and_whole_rows_per_tile():
    rng = np.random.default_rng(2)
    matrix = rng.standard_normal((96, 80)).astype(np.float32)   # 96 outputs, K = 80
    mask = pruning.tile_mask(matrix, 0.75, 16)
    assert abs((~mask).mean() - 0.75) < 16 / matrix.size + 1e-9
    dead = ~mask.any(axis=1)
    assert dead.sum() == int(96 * 0.75 * pruning.COLUMN_SHARE)   # whole outputs, globally
    for start in range(0, 96, 16):          # inside each tile (aligned to 16): whole rows
        tile = mask[start:start + 16][~dead[start:start + 16]]
        assert (tile.all(axis=0) | ~tile.any(axis=0)).all()
    # the columns pruned globally are the weakest ones
    norms = np.square(matrix).sum(axis=1)
    assert norms[dead].max() <= norms[~dead].min()


def test_tiles_aligned_to_blocks_of_16_leave_the_sparse_kernel_the_pruned_work_only():
    """With G a multiple of 16, each block of 16 outputs wpk's sparse kernel computes
    (direct_conv) lies in one tile: its live outputs keep the same rows, so the block skips
    every row the tile pruned."""
    rng = np.random.default_rng(5)
    for g in (16, 32, 128):
        matrix = rng.standard_normal((256, 192)).astype(np.float32)
        mask = pruning.tile_mask(matrix, 0.75, g)
        for block in mask.reshape(16, 16, 192):
            live = block[block.any(axis=1)]
            assert (live == live[:1]).all(), g


# --- prune(): which layers, what they hold --------------------------------------------------

def test_2_4_prunes_the_middle_layers_exactly_and_keeps_first_and_last_dense():
    model = small_net()
    pruned, layers = pruning.prune(model, pruning.parse_pattern("2:4"))
    by_node = {layer.node: layer for layer in layers}
    assert [l.node for l in layers if l.pruned] == ["conv2", "conv3", "fc"]
    assert "first prunable layer" in by_node["conv1"].reason
    assert "last prunable layer" in by_node["out"].reason
    for node in ("conv2", "conv3", "fc"):
        matrix = _matrix(pruned, node)
        assert ((matrix != 0).reshape(matrix.shape[0], -1, 4).sum(axis=-1) <= 2).all()
        assert by_node[node].sparsity == pytest.approx(0.5)
        assert by_node[node].pattern == "2:4"
    before, after = weights(model), weights(pruned)
    assert np.array_equal(before["c1w"], after["c1w"]) and np.array_equal(before["outw"],
                                                                          after["outw"])
    # the kept weights are the dense ones, unchanged
    kept = after["c2w"] != 0
    assert np.array_equal(after["c2w"][kept], before["c2w"][kept])


def test_2_4_runs_along_the_reduction_axis_of_each_layout():
    """Conv: Cin*kh*kw per output channel; MatMul B[K, N]: down the columns; Gemm transB."""
    pruned, layers = pruning.prune(small_net(), pruning.parse_pattern("2:4"),
                                   keep_first_last=False, min_weights=0)
    w = weights(pruned)
    conv = w["c2w"].reshape(32, -1)
    assert ((conv != 0).reshape(32, -1, 4).sum(-1) <= 2).all()
    fc = w["fcw"]                                # MatMul: K = 1024 rows
    assert ((fc.T != 0).reshape(128, -1, 4).sum(-1) <= 2).all()
    out = w["outw"]                              # Gemm transB=1: [N=10, K=128]
    assert ((out != 0).reshape(10, -1, 4).sum(-1) <= 2).all()
    # conv1's K = 27 is no multiple of 4: skipped, with the reason
    assert "K = 27 is not a multiple of M = 4" in layers[0].reason


def test_tile_reaches_the_ratio_and_skip_and_min_weights_keep_layers_dense():
    model = small_net()
    pruned, layers = pruning.prune(model, pruning.parse_pattern("tile:16"), 0.75,
                                   skip=["conv3"], min_weights=5000)
    by_node = {layer.node: layer for layer in layers}
    assert by_node["conv3"].reason == "--skip"
    assert "too small to gain" in by_node["conv2"].reason       # 4608 weights < 5000
    assert [l.node for l in layers if l.pruned] == ["fc"]
    assert by_node["fc"].sparsity == pytest.approx(0.75, abs=16 / (1024 * 128) + 1e-9)


@pytest.mark.parametrize("pattern, ratio, message", [
    ("3:2", None, "N must be less than M"),
    ("4:4", None, "N must be less than M"),
    ("0:4", None, "N must be at least 1"),
    ("diagonal", None, "unknown pattern"),
    ("tile", None, "needs --ratio"),
    ("tile:8", 1.0, "must be in (0, 1)"),
    ("tile:8", 0.0, "must be in (0, 1)"),
    ("2:4", 0.75, "does not match --pattern 2:4"),
])
def test_bad_patterns_and_ratios_are_refused(pattern, ratio, message):
    with pytest.raises(WpkError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pruning.prune(small_net(), pruning.parse_pattern(pattern), ratio)


def test_a_model_without_prunable_layers_is_refused():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(WpkError, match="no prunable layer"):
        pruning.prune(helper.make_model(graph), pruning.parse_pattern("2:4"))
    with pytest.raises(WpkError, match="no layer left to prune"):   # all of them skipped
        pruning.prune(small_net(), pruning.parse_pattern("2:4"),
                      skip=["conv2", "conv3", "fc"])
    with pytest.raises(WpkError, match="--skip conv9: no prunable node"):
        pruning.prune(small_net(), pruning.parse_pattern("2:4"), skip=["conv9"])


# --- measure(): deviations and accuracy ----------------------------------------------------

def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_the_report_measures_the_model_output_deviation_as_onnx_runtime_sees_it():
    model = small_net()
    pruned, layers = pruning.prune(model, pruning.parse_pattern("2:4"))
    rng = np.random.default_rng(3)
    samples = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    measured = pruning.measure(model, pruned, layers, samples, "test", False)
    dense = np.concatenate([_run(model, s["x"]) for s in samples])
    sparse = np.concatenate([_run(pruned, s["x"]) for s in samples])
    expected = np.linalg.norm(sparse - dense) / np.linalg.norm(dense)
    assert measured.outputs[0].relative == pytest.approx(expected, rel=1e-4)
    assert measured.outputs[0].max_abs == pytest.approx(np.abs(sparse - dense).max(), rel=1e-4)
    assert measured.accuracy is None
    by_node = {layer.node: layer for layer in layers}
    assert by_node["conv1"].own_deviation is None                 # not pruned: not measured
    # the first pruned layer sees dense inputs in both models: own = cumulative
    assert by_node["conv2"].own_deviation == pytest.approx(by_node["conv2"].cumulative_deviation)
    for node in ("conv2", "conv3", "fc"):
        assert 0 < by_node[node].own_deviation < 1.5


def test_accuracy_only_with_labels_and_counted_per_row():
    model = small_net()
    pruned, layers = pruning.prune(model, pruning.parse_pattern("2:4"))
    rng = np.random.default_rng(4)
    samples = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(10)]
    dense = np.concatenate([_run(model, s["x"]) for s in samples]).argmax(axis=1)
    sparse = np.concatenate([_run(pruned, s["x"]) for s in samples]).argmax(axis=1)
    labels = dense.copy()
    labels[:3] = (labels[:3] + 1) % 10                          # 70 % dense accuracy
    measured = pruning.measure(model, pruned, layers, samples, "test", False, labels, "l.npy")
    assert measured.accuracy.dense == pytest.approx(0.7)
    assert measured.accuracy.pruned == pytest.approx((sparse == labels).mean())
    assert measured.accuracy.top1_agreement == pytest.approx((sparse == dense).mean())
    with pytest.raises(WpkError, match="9 labels for 10 predictions"):
        pruning.measure(model, pruned, layers, samples, "test", False, labels[:9], "l.npy")


# --- the command ---------------------------------------------------------------------------

def test_cli_writes_the_model_and_json_report_and_says_accuracy_was_not_measured(model_file):
    result = run_cli(str(model_file), "-o", "pruned.onnx", "--pattern", "2:4",
                     cwd=model_file.parent)
    assert result.returncode == 0, result.stderr
    assert "accuracy: not measured (no --labels)" in result.stdout
    assert "random normal inputs" in result.stdout
    assert "first prunable layer" in result.stderr and "conv2" in result.stderr
    report = json.loads((model_file.parent / "pruned.report.json").read_text())
    assert report["accuracy"] is None and report["data"]["random_inputs"] is True
    assert report["pattern"] == "2:4" and report["pruned_layers"] == 3
    assert {l["node"]: l["pruned"] for l in report["layers"]} == {
        "conv1": False, "conv2": True, "conv3": True, "fc": True, "out": False}
    pruned = onnx.load(str(model_file.parent / "pruned.onnx"))
    assert (weights(pruned)["fcw"] == 0).mean() == pytest.approx(0.5)
    # a second run does not replace the earlier result without --force
    again = run_cli(str(model_file), "-o", "pruned.onnx", "--pattern", "2:4",
                    cwd=model_file.parent)
    assert again.returncode == 2 and "pass --force" in again.stderr


def test_cli_with_calibration_data_and_labels_reports_accuracy(model_file):
    folder = model_file.parent
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 3, 8, 8)).astype(np.float32)
    np.savez(folder / "samples.npz", x=x)
    np.save(folder / "labels.npy", rng.integers(0, 10, 12))
    result = run_cli(str(model_file), "-o", "tile.onnx", "--pattern", "tile:32", "--ratio",
                     "0.75", "--calibration-data", "samples.npz", "--labels", "labels.npy",
                     "-q", cwd=folder)
    assert result.returncode == 0, result.stderr
    assert "accuracy on 12 labelled samples" in result.stdout
    report = json.loads((folder / "tile.report.json").read_text())
    assert report["data"] == {"source": "samples.npz (12 samples)", "samples": 12,
                              "random_inputs": False}
    assert report["accuracy"]["samples"] == 12
    assert report["pruned_weights_sparsity"] == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("args, message", [
    (["-o", "p.onnx", "--pattern", "5:4"], "N must be less than M"),
    (["-o", "p.onnx", "--pattern", "checkerboard"], "unknown pattern"),
    (["-o", "p.onnx", "--pattern", "tile", "--ratio", "1.5"], "must be in (0, 1)"),
    (["-o", "p.onnx", "--pattern", "tile", "--ratio", "0"], "must be in (0, 1)"),
    (["-o", "p.onnx", "--pattern", "tile", "--ratio", "most"], "not a number"),
    (["-o", "model.onnx", "--pattern", "2:4"], "is the input model"),
    (["-o", "p.onnx", "--pattern", "2:4", "--labels", "l.npy"], "--labels needs"),
    (["-o", "p.onnx"], "--pattern is needed"),
    (["--pattern", "2:4"], "-o/--output is needed"),
    (["-o", "p.onnx", "--pattern", "2:4", "--skip", "nothere"], "--skip nothere"),
])
def test_cli_bad_input_is_one_line(model_file, args, message):
    result = run_cli("model.onnx", *args, cwd=model_file.parent)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wpk: error: ") and message in lines[0], \
        result.stderr
    assert not (model_file.parent / "p.onnx").exists()


def test_cli_no_prunable_layer_is_one_line(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "relu.onnx"))
    result = run_cli("relu.onnx", "-o", "p.onnx", "--pattern", "2:4", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no prunable layer" in result.stderr
