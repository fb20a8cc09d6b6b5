"""wpk-serve prints warnings as one line `wpk: warning: ...`, like wpk-optimize: an
OpenVINO-optimized slice served by ONNX Runtime in a process where openvino is unimportable,
and `--link grpc`, a transport that was removed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from wpk.examples import mlp

from ..conftest import openvino_plan

SERVE_WITHOUT_OPENVINO = ("import sys; sys.modules['openvino'] = None\n"
                          "from wpk.runtime.server import main\n"
                          "sys.exit(main(sys.argv[1:]))\n")


def serve_until_ready(argv: list[str], env: dict | None = None) -> tuple[str, str]:
    """Start wpk-serve (`argv` after the interpreter), stop it once ready: (ready line, its
    stderr); it must have exited 0."""
    process = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready = process.stdout.readline()
        assert "ready on" in ready, process.communicate(timeout=30)[1]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    return ready, stderr


def test_serving_an_openvino_slice_without_openvino_warns_in_one_line(tmp_path):
    plan_dir = openvino_plan(mlp(features=16, hidden=(16,), classes=4), tmp_path)
    _, stderr = serve_until_ready(["-c", SERVE_WITHOUT_OPENVINO, str(plan_dir), "--tier",
                                   "edge", "--port", "0"],
                                  env={**os.environ, "PYTHONWARNINGS": "default"})
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr             # Python's format takes two (file:line, source)
    assert lines[0].startswith("wpk: warning: ")
    assert "cannot run here" in lines[0] and "ONNX Runtime instead" in lines[0]
    assert "UserWarning" not in stderr and "warn_once" not in stderr


def test_link_grpc_a_removed_transport_warns_in_one_line_and_serves_the_tensor_link(plans):
    ready, stderr = serve_until_ready(["-m", "wpk.runtime.server", str(plans["mlp"]), "--tier",
                                       "cloud", "--port", "0", "--threads", "1", "--link",
                                       "grpc"])
    assert " tensor-link " in ready
    assert stderr.splitlines() == ["wpk: warning: --link grpc: gRPC streams between tiers "
                                   "were removed; using the tensor link (--link tcp)"]
