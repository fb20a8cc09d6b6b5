"""wpk-profile on the command line, and its import path free of optional dependencies."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from wpk.profile_cli import main
from wpk.profile_format import load_profile


def test_cli_writes_a_valid_profile(example_models, tmp_path, capsys):
    out = tmp_path / "edge-a.json"
    rc = main([str(example_models["mlp"]), "-o", str(out), "--name", "edge-a", "--threads",
               "1", "--warmup", "0", "--runs", "3", "--top", "3"])
    assert rc == 0
    profile = load_profile(out)
    assert profile.device_name == "edge-a" and profile.runs == 3 and profile.threads == 1
    printed = capsys.readouterr().out
    assert "slowest nodes of mlp on edge-a" in printed and "gemm_3" in printed
    assert str(out) in printed


def test_cli_default_output_is_the_device_name(example_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(example_models["mlp"]), "--name", "pi4", "--runs", "2", "-q"]) == 0
    assert load_profile(tmp_path / "pi4.json").device_name == "pi4"


def test_cli_never_writes_over_its_model_nor_silently_over_a_profile(example_models, tmp_path,
                                                                     capsys):
    """`wpk-profile m.onnx -o m.onnx` once replaced the model with JSON."""
    model = tmp_path / "m.onnx"
    model.write_bytes(example_models["mlp"].read_bytes())
    for extra in ([], ["--force"]):
        assert main([str(model), "-o", str(model), "-q", "--runs", "1", *extra]) == 2
        assert "is an input of this command" in capsys.readouterr().err
        assert model.read_bytes() == example_models["mlp"].read_bytes()
    out = tmp_path / "p.json"
    assert main([str(model), "-o", str(out), "-q", "--runs", "1", "--name", "a"]) == 0
    assert main([str(model), "-o", str(out), "-q", "--runs", "1", "--name", "b"]) == 2
    assert "p.json: exists (an earlier result); pass --force" in capsys.readouterr().err
    assert load_profile(out).device_name == "a"
    assert main([str(model), "-o", str(out), "-q", "--runs", "1", "--name", "b",
                 "--force"]) == 0
    assert load_profile(out).device_name == "b"


def test_cli_bad_input_is_one_line(tmp_path, capsys, example_models):
    assert main([str(tmp_path / "absent.onnx"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"wpk: error: {tmp_path / 'absent.onnx'}: no such file"
    assert main([str(example_models["mlp"]), "--provider", "tpu", "-q"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main([str(example_models["mlp"]), "--input-shape", "features=1xq", "-q"]) == 2
    assert "bad shape" in capsys.readouterr().err
    assert main([str(example_models["mlp"]), "-o", str(tmp_path), "-q", "--runs", "1"]) == 2
    assert "is a directory" in capsys.readouterr().err
    # the library's check names its parameters; the command line names the flags
    assert main([str(example_models["mlp"]), "-o", str(tmp_path / "p.json"), "-q", "--runs",
                 "0"]) == 2
    assert capsys.readouterr().err == \
        "wpk: error: --runs must be at least 1 and --warmup at least 0\n"


def test_an_absurd_thread_count_is_refused_at_once(example_models, tmp_path, capsys):
    """--threads 100000 once hung ONNX Runtime for minutes starting threads."""
    import os

    with pytest.raises(SystemExit) as stop:   # at parse time, before ONNX Runtime starts
        main([str(example_models["mlp"]), "-o", str(tmp_path / "p.json"), "--threads",
              "100000", "-q"])
    assert stop.value.code == 2 and not (tmp_path / "p.json").exists()
    assert f"at most 4 x this machine's {os.cpu_count()} logical cores" in \
        capsys.readouterr().err


BLOCKED = ["grpc", "grpc_tools", "tritonclient", "matplotlib", "paho", "paho.mqtt", "deap",
           "zstandard", "wpk.optimizer", "wpk.runtime", "wpk.deploy", "wpk.partitioner"]


def test_imports_only_core_dependencies(example_models, tmp_path):
    """As on a small ARM board: nothing from gRPC, the optimizer, plotting or MQTT."""
    out = tmp_path / "board.json"
    script = textwrap.dedent(f"""
        import sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None   # importing any of them now raises ImportError
        import wpk.profiling, wpk.profile_format, wpk.profile_cli
        from wpk.profile_cli import main
        rc = main([{str(example_models['mlp'])!r}, "-o", {str(out)!r}, "--runs", "2", "-q"])
        loaded = sorted(m for m, module in sys.modules.items() if module is not None
                        and m.split(".")[0] in ("grpc", "tritonclient", "matplotlib", "paho",
                                                "deap", "zstandard", "google.protobuf.grpc"))
        print(rc, loaded)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0 []"
    assert json.loads(out.read_text())["version"] == 1
