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
    """As the README's first command does on a fresh checkout: the report goes into a folder
    that does not exist yet, beside the plan's."""
    out = tmp_path / "out" / "resnet_like"
    report = tmp_path / "out" / "resnet_like.png"
    code = main([str(resnet_path), "--tiers", "device,edge,cloud", "-o", str(out),
                 "--report", str(report), "--pareto", "--top", "2", "--no-calibrate"])
    assert code == 0
    text = capsys.readouterr().out
    assert "end-to-end latency" in text and "verified" in text and "Pareto" in text
    assert report.stat().st_size > 10_000
    plan = json.loads((out / "plan.json").read_text())
    for tier in plan["tiers"]:
        assert (out / tier["slice"]).exists()


def test_cli_json_output(mlp_path, tmp_path, capsys):
    assert main([str(mlp_path), "-o", str(tmp_path), "--json", "--no-calibrate",
                 "--objective", "throughput"]) == 0
    assert json.loads(capsys.readouterr().out)["objective"]["name"] == "throughput"


def test_cli_throughput_objective_compares_throughput(mlp_path, tmp_path, capsys):
    assert main([str(mlp_path), "-o", str(tmp_path), "--no-calibrate",
                 "--objective", "throughput"]) == 0
    assert "x the throughput" in capsys.readouterr().out


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
def no_external_data(mlp_path, tmp_path):
    import onnx

    path = tmp_path / "external.onnx"
    onnx.save(onnx.load(str(mlp_path)), str(path), save_as_external_data=True,
              location="external.data", size_threshold=0)
    (tmp_path / "external.data").unlink()
    return path


@pytest.fixture
def future_opset(mlp_path, tmp_path):
    import onnx

    model = onnx.load(str(mlp_path))
    model.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    onnx.save(model, str(path))
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
    ("no_external_data", "external.data"),
    ("future_opset", "ONNX Runtime cannot run 'mlp': ONNX Runtime only"),
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
    elif case in ("not_onnx", "truncated", "no_external_data", "future_opset"):
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
    assert "Traceback" not in result.stderr and "onnxruntime_src" not in result.stderr
    assert not (tmp_path / "out" / "plan.json").exists()


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("args, message", [
    (["--link", "device-edge=.mbit,5ms"], "bad bandwidth"),
    (["--link", "device-edge=1.2.3mbit,5ms"], "bad bandwidth"),
    (["--link", "device-edge=1mbit,5..ms"], "bad time"),
    (["--tiers-file", "{tmp}"], "is a directory"),
    (["--tiers-file", "{tmp}/binary.yaml"], "not UTF-8"),
    (["--tiers-file", "{tmp}/providers.yaml"], "providers must be a list"),
    (["--tiers-file", "{tmp}/preset.yaml"], "unknown hardware preset"),
    (["--tiers-file", "{tmp}/role.yaml"], "role must be one of"),
    (["--tiers-file", "{tmp}/cores.yaml"], "cores must be a number"),
    (["--tiers-file", "{tmp}/overhead.yaml"], "op_overhead_us must not be negative"),
    (["--tiers-file", "{tmp}/link_to.yaml"], "link to unknown tier 'egde'"),
    (["--tiers-file", "{tmp}/link_list.yaml"], "links[0] needs 'from' and 'to'"),
    (["--tiers-file", "{tmp}/linkz.yaml"], "unknown key 'linkz' (did you mean 'links'?)"),
    (["--tiers-file", "{tmp}/jitter.yaml"], "link device-edge: unknown key 'jitter'"),
    (["--tiers-file", "{tmp}/twice.yaml"], "link device-edge: given twice"),
    (["--tiers-file", "{tmp}/backwards.yaml"], "link edge-device goes backwards"),
    (["--tiers-file", "{tmp}/itself.yaml"], "link edge-edge: joins a tier to itself"),
    (["--tiers-file", "{tmp}/field.yaml"], "unknown field 'cors' (did you mean 'cores'?)"),
    (["--report", "{tmp}/report.xyz"], "matplotlib cannot write .xyz files"),
    (["--report", "{tmp}/r.txt"], "matplotlib cannot write .txt files"),
    (["--report", "{tmp}"], "is a directory; name the image to write"),
    (["--max-latency-ms", "nan"], "--max-latency-ms must be a positive number, not nan"),
    (["--objective", "bandwidth"], "the bandwidth objective needs a latency bound: "
                                   "--max-latency-ms"),
    (["-o", "{tmp}/blocked"], "cannot write"),
    (["--report", "{tmp}/binary.yaml/r.png"], "binary.yaml is not a directory"),
    (["--tiers", ""], "an empty tier name"),
    (["--codec", "device-edge="], "bad codec 'device-edge='"),
    (["--input-shape", "features=2x7"], "features=2x7 does not fit the model: node gemm_"),
    (["--pin", "gemm_7=device", "--pin", "gemm_7=edge"], "'gemm_7' is already pinned to"),
    (["--tiers", "device,,edge"], "an empty tier name"),
])
def test_more_bad_input_is_one_line(args, message, mlp_path, tmp_path, capsys):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    _write(tmp_path / "providers.yaml", "tiers:\n  - {name: device, providers: 5}\n")
    _write(tmp_path / "preset.yaml", "tiers:\n  - {name: device, preset: [1]}\n")
    _write(tmp_path / "role.yaml", "tiers:\n  - {name: device}\n  - {name: edge, role: fog}\n")
    _write(tmp_path / "cores.yaml", "tiers:\n  - {name: device, cores: many}\n")
    _write(tmp_path / "overhead.yaml", "tiers:\n  - {name: device, op_overhead_us: -5}\n")
    _write(tmp_path / "link_to.yaml", "tiers:\n  - {name: device}\n  - {name: edge}\n"
           "links:\n  - {from: device, to: egde, bandwidth: 1mbit, rtt: 1ms}\n")
    _write(tmp_path / "link_list.yaml", "tiers:\n  - {name: device}\n  - {name: edge}\n"
           "links:\n  - {from: [device], to: edge, bandwidth: 1mbit, rtt: 1ms}\n")
    two = "tiers:\n  - {name: device}\n  - {name: edge}\n"
    link = "  - {from: device, to: edge, bandwidth: 20mbit, rtt: 5ms}\n"
    _write(tmp_path / "linkz.yaml", two + "linkz:\n" + link)
    _write(tmp_path / "jitter.yaml", two + "links:\n" + link.replace("}", ", jitter: 1ms}"))
    _write(tmp_path / "twice.yaml", two + "links:\n" + link + link.replace("20mbit", "1kbit"))
    _write(tmp_path / "backwards.yaml", two + "links:\n" + link.replace(
        "from: device, to: edge", "from: edge, to: device"))
    _write(tmp_path / "itself.yaml", two + "links:\n" + link.replace("device", "edge"))
    _write(tmp_path / "field.yaml", "tiers:\n  - {name: device, cors: 4}\n")
    (tmp_path / "blocked" / "device.onnx").mkdir(parents=True)  # a slice cannot be written
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out")]
    code = main([str(mlp_path), "--no-calibrate", "--tiers", "device,edge", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("wpk: error:"), err
    assert message in err
    assert not (tmp_path / "out").exists()         # refused before any work was written


def test_onnx_runtime_errors_lose_their_wrapping_and_keep_what_to_do():
    from wpk.errors import ort_error_line

    error = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed:/onnxruntime_src/"
        "onnxruntime/core/graph/model_load_utils.h:46 void onnxruntime::model_load_utils::"
        "ValidateOpsetForDomain(const std::unordered_map<std::string, int>&, bool) Opset 99 "
        "is not supported. " + "Padding sentence. " * 30 + "Support is till opset 28.\n")
    line = ort_error_line(error)
    assert line.startswith("Load model from m.onnx failed:Opset 99 is not supported.")
    assert line.endswith("... Support is till opset 28.") and "onnxruntime_src" not in line
    assert ort_error_line(RuntimeError("short")) == "short"


def test_a_new_plan_over_an_optimized_one_warns_that_they_no_longer_apply(mlp_path, tmp_path,
                                                                          capsys):
    (tmp_path / "optimized" / "edge").mkdir(parents=True)
    (tmp_path / "optimized" / "edge" / "optimized.json").write_text("{}")
    assert main([str(mlp_path), "--no-calibrate", "--tiers", "device,edge", "-o",
                 str(tmp_path)]) == 0
    assert "the new plan does not use them (run wpk-optimize again)" in capsys.readouterr().err


def test_an_input_model_in_the_output_directory_is_never_overwritten(mlp_path, tmp_path,
                                                                     capsys):
    """`wpk-partition d/edge.onnx -o d` once replaced the model with its own edge slice."""
    model = tmp_path / "edge.onnx"
    model.write_bytes(mlp_path.read_bytes())
    for extra in ([], ["--force"]):
        code = main([str(model), "--no-calibrate", "--tiers", "device,edge", "-o",
                     str(tmp_path), *extra])
        assert code == 2
        assert "is an input of this command" in capsys.readouterr().err
        assert model.read_bytes() == mlp_path.read_bytes()
        assert not (tmp_path / "plan.json").exists()


def test_an_earlier_plan_is_replaced_only_with_force(mlp_path, tmp_path, capsys):
    out = tmp_path / "plan"
    args = [str(mlp_path), "--no-calibrate", "--tiers", "device,edge", "-o", str(out)]
    assert main(args) == 0
    first = (out / "plan.json").read_text()
    (out / "plan.json").write_text(first.replace('"latency"', '"latency" '))
    assert main(args + ["--objective", "throughput"]) == 2
    assert "plan.json: exists (an earlier result); pass --force" in capsys.readouterr().err
    assert (out / "plan.json").read_text() != first                 # untouched
    assert main(args + ["--objective", "throughput", "--force"]) == 0
    assert json.loads((out / "plan.json").read_text())["objective"]["name"] == "throughput"


def test_an_existing_report_is_refused_before_any_work(mlp_path, tmp_path, capsys):
    report = tmp_path / "r.png"
    report.write_bytes(b"an earlier report")
    code = main([str(mlp_path), "--no-calibrate", "--tiers", "device,edge", "-o",
                 str(tmp_path / "out"), "--report", str(report)])
    assert code == 2 and "r.png: exists" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and report.read_bytes() == b"an earlier report"


def test_a_model_ending_a_nodes_inputs_with_an_empty_name_is_partitioned(tmp_path):
    """`LayerNormalization(h, scale, "")` is valid ONNX (the bias left out), but ONNX Runtime
    1.32 dies with a segmentation fault loading it; wpk drops trailing empty inputs when it
    reads a model, so the plan is written (run in a subprocess: the crash would take
    pytest with it)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from wpk.graph import load_model

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("LayerNormalization", ["h", "scale", ""], ["y"], name="ln")]
    graph = helper.make_graph(
        nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32])],
        [helper.make_tensor("scale", TensorProto.FLOAT, [32], np.ones(32)),
         helper.make_tensor("w", TensorProto.FLOAT, [32, 32], np.linspace(-1, 1, 32 * 32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "ln.onnx"
    onnx.save(model, str(path))
    assert list(load_model(path).graph.node[1].input) == ["h", "scale"]
    result = run_cli(path, "--tiers", "device,edge,cloud", "-o", tmp_path / "plan")
    assert result.returncode == 0, result.stderr[-500:]
    assert (tmp_path / "plan" / "plan.json").exists()
