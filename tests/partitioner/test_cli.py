"""wpk-partition as a user runs it: tables, files, and one-line errors for bad input."""
import json
import subprocess
import sys

import pytest

from wpk.partitioner.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "wpk.partitioner.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_plan_report_and_tables(resnet_path, tmp_path, capsys):
    out = tmp_path / "plan"
    code = main([str(resnet_path), "--tiers", "device,edge,cloud", "-o", str(out),
                 "--report", str(tmp_path / "r.png"), "--pareto", "--top", "2",
                 "--no-calibrate"])
    assert code == 0
    text = capsys.readouterr().out
    assert "end-to-end latency" in text and "verified" in text and "Pareto" in text
    assert (tmp_path / "r.png").stat().st_size > 10_000
    plan = json.loads((out / "plan.json").read_text())
    for tier in plan["tiers"]:
        assert (out / tier["slice"]).exists()


def test_cli_json_output(mlp_path, tmp_path, capsys):
    assert main([str(mlp_path), "-o", str(tmp_path), "--json", "--no-calibrate",
                 "--objective", "throughput"]) == 0
    assert json.loads(capsys.readouterr().out)["objective"]["name"] == "throughput"


@pytest.fixture
def not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n")
    return path


@pytest.fixture
def truncated(mlp_path, tmp_path):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(mlp_path.read_bytes()[:5000])
    return path


@pytest.fixture
def bad_yaml(tmp_path):
    path = tmp_path / "tiers.yaml"
    path.write_text("tiers:\n  - name: device\n    peak_gflops: [1, 2\n")
    return path


@pytest.fixture
def wrong_yaml(tmp_path):
    path = tmp_path / "tiers2.yaml"
    path.write_text("tiers:\n  - {name: device}\n  - {name: edge, peak_gflops: fast}\n")
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("not_onnx", "not a readable ONNX model"),
    ("truncated", "not a readable ONNX model"),
    ("unknown_tier", "unknown tier 'fog'"),
    ("bad_yaml", "malformed YAML"),
    ("wrong_yaml", "peak_gflops must be a number"),
    ("bad_link", "bad bandwidth"),
    ("impossible_slo", "impossible constraint"),
    ("impossible_pin", "raw input"),
])
def test_bad_input_is_one_line_and_nonzero(case, message, request, mlp_path, tmp_path):
    model = mlp_path
    extra: list = ["--no-calibrate", "-o", tmp_path / "out"]
    if case == "missing":
        model = tmp_path / "missing.onnx"
    elif case in ("not_onnx", "truncated"):
        model = request.getfixturevalue(case)
    elif case == "unknown_tier":
        extra += ["--tiers", "device,fog"]
    elif case in ("bad_yaml", "wrong_yaml"):
        extra += ["--tiers-file", request.getfixturevalue(case)]
    elif case == "bad_link":
        extra += ["--link", "device-edge=fast,5ms"]
    elif case == "impossible_slo":
        extra += ["--max-latency-ms", "0.001"]
    elif case == "impossible_pin":
        extra += ["--pin", "gemm_3=cloud"]
    result = run_cli(model, *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wpk: error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "plan.json").exists()
