"""Latency tables: the grid, timing a few operators for real, the file format, and
`wpk-profile --ops`."""
from __future__ import annotations

import copy
import json

import jsonschema
import onnx
import pytest

from wpk import op_bench
from wpk.errors import WpkError
from wpk.graph import Graph
from wpk.json_schema import load_schema
from wpk.op_features import node_features
from wpk.op_grid import conv, grid
from wpk.op_table import load_table, save_table
from wpk.profile_cli import main

from tests.profile.op_tables import power_law_table, write_table

FEW = [conv(16, 16, 14, 3), conv(3, 16, 32, 3, 2)]


@pytest.fixture(scope="module")
def measured() -> dict:
    """Two convolutions timed here, twice over (one thread, few runs: a unit test)."""
    from wpk.op_grid import OpCase

    cases = FEW + [OpCase("Relu 1x16x14x14", "Relu", ((1, 16, 14, 14),)),
                   OpCase("Gemm 4x64 . 64x32", "Gemm", ((4, 64),), ((32, 64), (32,)),
                          {"transB": 1})]
    return op_bench.time_operators(threads=1, runs=3, warmup=1, progress=False, name="here",
                                   cases=cases, rounds=2)


def test_the_grids_build_valid_single_operator_models():
    default, full = grid("default"), grid("full")
    assert 150 <= len(default) <= 400 and len(full) > 2 * len(default)
    assert {c.name for c in default} <= {c.name for c in full}
    assert len({c.name for c in full}) == len(full)
    families = set()
    for case in default:
        model = case.model()
        onnx.checker.check_model(model)
        graph = Graph.load(model)
        assert len(graph.nodes) == 1
        families.add(node_features(graph.nodes[0], graph).family)
    assert {"conv-k1", "conv-k3", "conv-k5", "conv-k7", "depthwise-k3", "depthwise-k5",
            "grouped-k3", "transposed-k2", "gemm", "matmul", "softmax", "layernorm", "maxpool", "avgpool",
            "reduce", "binary", "act-Relu", "act-Gelu", "copy-Concat", "lrn"} <= families
    with pytest.raises(ValueError):
        grid("huge")


def test_timed_table_is_valid_and_complete(measured, tmp_path):
    jsonschema.validate(measured, load_schema("op-table"))
    assert measured["rounds"] == 2 and measured["grid"] == "custom"
    cases = [e for e in measured["entries"] if e["family"] != "reorder"]
    assert [e["case"] for e in cases] == [c.name for c in FEW] + ["Relu 1x16x14x14",
                                                                  "Gemm 4x64 . 64x32"]
    assert all(e["ms"] > 0 and e["runs"] == 6 for e in cases)   # 3 runs x 2 rounds
    assert measured["overhead_ms"]["node"] >= 0 and measured["overhead_ms"]["run"] >= 0
    calibration = measured["calibration"]
    assert set(calibration["networks"]) == {"resnet_like_w16", "resnet_like_w64",
                                            "resnet_like_w128", "mobilenet_like", "mlp"}
    assert 0.5 <= calibration["scale"] <= 2.0
    fit = calibration["footprint"]
    assert fit["low"] < fit["center"] < fit["high"]
    path = save_table(measured, tmp_path / "t.json")
    table = load_table(path)
    assert table.device_name == "here" and table.threads == 1
    assert len(table.entries) == len(measured["entries"])
    if measured["layout"]["nchwc_block"]:       # x86 with AVX2/AVX-512: reorders timed too
        assert any(e.family == "reorder" for e in table.entries)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(version=2), "unsupported latency table version 2"),
    (lambda d: d.pop("overhead_ms"), "'overhead_ms' is missing"),
    (lambda d: d["entries"][0].update(ms=0), "entries[0].ms"),
    (lambda d: d["entries"][0].update(family="conv k3"), "entries[0].family"),
    (lambda d: d.update(entries=[]), "entries"),
    (lambda d: (d.pop("kind"), d.update(nodes=[])), "a profile of one model, not a latency"),
])
def test_bad_tables_are_one_line_errors(tmp_path, change, message):
    document = copy.deepcopy(power_law_table())
    change(document)
    path = write_table(tmp_path / "t.json", document)
    with pytest.raises(WpkError) as caught:
        load_table(path)
    assert message in str(caught.value) and str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cli_ops_writes_a_table(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(op_bench, "grid", lambda kind: FEW)
    out = tmp_path / "pi-ops.json"
    assert main(["--ops", "-o", str(out), "--name", "pi", "--threads", "1", "--runs", "2",
                 "--warmup", "0", "--rounds", "1"]) == 0
    assert load_table(out).device_name == "pi"
    printed = capsys.readouterr().out
    assert "latency table of pi" in printed and "conv-k3" in printed and str(out) in printed
    assert main(["--ops", "-o", str(out), "-q"]) == 2
    assert "exists (an earlier result)" in capsys.readouterr().err


def test_cli_ops_refusals_are_one_line(tmp_path, capsys, mlp_path):
    assert main(["-q"]) == 2
    assert "name the model to profile, or pass --ops" in capsys.readouterr().err
    assert main(["--ops", str(mlp_path), "-o", str(tmp_path / "t.json"), "-q"]) == 2
    assert "--ops times a grid of operators, not a model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ops", "--grid", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_a_table_given_as_a_profile_is_named(tmp_path):
    from wpk.profile_format import load_profile

    path = write_table(tmp_path / "t.json", power_law_table())
    with pytest.raises(WpkError, match="a latency table, not a profile of one model"):
        load_profile(path)
    assert json.loads(path.read_text())["kind"] == "op-table"
