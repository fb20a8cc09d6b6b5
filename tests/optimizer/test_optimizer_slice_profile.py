"""A profile of an optimized slice: wpk's custom operators timed in place and their time put
on the model's own nodes, so that a plan prices the slice as it runs."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from wpk.errors import WpkError
from wpk.optimizer import ort_ops, passes
from wpk.optimizer.pipeline import save_custom_ops
from wpk.optimizer.selection import select_custom_ops
from wpk.optimizer.session import DEFAULT_SESSION
from wpk.optimizer.slice_profile import profile_optimized
from wpk.profile_format import validate_profile

from .test_optimizer_direct_conv import _offline, _sparse_cnn

pytestmark = pytest.mark.skipif(not ort_ops.runs_here()[0], reason=ort_ops.runs_here()[1])


def test_custom_operators_time_lands_on_the_nodes_they_replace(tmp_path):
    model = _sparse_cnn("tile")
    onnx.save(model, str(tmp_path / "model.onnx"))
    passed, _ = passes.run_passes(model)
    offline = _offline(passed, tmp_path)
    feed = {"image": np.ones((1, 16, 14, 14), np.float32)}
    names = [o.name for o in passed.graph.output]
    inside = select_custom_ops(passed, offline, dict(DEFAULT_SESSION), feed, names, passes=0,
                               start_with_kernels=True, kinds=("direct",))
    directory = save_custom_ops(passed, inside, tmp_path / "opt")
    document = profile_optimized(tmp_path / "model.onnx", directory, runs=5, warmup=1,
                                 progress=False)
    validate_profile(document, "profile")            # a profile wpk-partition reads
    assert document["ran"] == {"model": "model.wpk.onnx", "custom_ops": "wpk_ops.so"}
    assert document["attribution"]["unmapped"] == 0
    convs = [n for n in document["nodes"] if n["op_type"] == "Conv"]
    assert len(convs) == 2 and all(n["ms"] > 0 for n in convs)
    total = sum(n["ms"] for n in document["nodes"])
    assert total == pytest.approx(document["total_ms"]["median"], rel=0.01)


def test_a_directory_that_is_no_single_session_is_refused_in_one_line(tmp_path):
    directory = tmp_path / "opt"
    directory.mkdir()
    (directory / "optimized.json").write_text(json.dumps({"segments": []}))
    with pytest.raises(WpkError):
        profile_optimized(tmp_path / "model.onnx", directory)


def test_wpk_optimize_reports_sparsity_and_writes_the_profile(tmp_path, capsys):
    from wpk.optimizer.cli import main

    onnx.save(_sparse_cnn("tile"), str(tmp_path / "model.onnx"))
    assert main([str(tmp_path / "model.onnx"), "-o", str(tmp_path / "opt"), "--budget-trials",
                 "2", "--budget-seconds", "20", "--no-openvino", "-q", "--log",
                 str(tmp_path / "log.jsonl"), "--profile", str(tmp_path / "edge.json")]) == 0
    report = json.loads((tmp_path / "opt" / "report.json").read_text())
    assert report["sparsity"]["patterns"] == {"tile:32": 2}
    assert 0 <= report["sparsity"]["kernels"] <= 2     # how many the timing kept
    document = json.loads((tmp_path / "edge.json").read_text())
    validate_profile(document, "edge.json")
    assert len(document["nodes"]) == len(onnx.load(str(tmp_path / "model.onnx")).graph.node)
    # never over the model itself
    assert main([str(tmp_path / "model.onnx"), "-o", str(tmp_path / "opt2"), "--profile",
                 str(tmp_path / "model.onnx")]) != 0
    assert "is an input of this command" in capsys.readouterr().err
