"""--cpu-latency-us: a tier holds the machine's PM QoS CPU-latency limit while it serves, and
the limit ends with it; bad values and unusable devices are one-line errors."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from wpk.errors import WpkError
from wpk.runtime.cpu_latency import DEVICE, CpuLatencyLimit, cpu_latency_limit, current_limit

writable = pytest.mark.skipif(not os.access(DEVICE, os.W_OK),
                              reason=f"{DEVICE} is not writable here (needs Linux and root)")
LIMIT_US = 3


def free_of_lower_limits() -> int:
    """The limit in force now; skips when another process already holds one at or below ours
    (then ours would not show)."""
    before = current_limit()
    if before is None or before <= LIMIT_US:
        pytest.skip(f"another process holds a CPU latency limit of {before} us")
    return before


@writable
def test_a_held_limit_is_in_force_until_closed():
    before = free_of_lower_limits()
    with CpuLatencyLimit(LIMIT_US):
        assert current_limit() == LIMIT_US
    assert current_limit() == before
    with cpu_latency_limit(None):   # None holds nothing
        assert current_limit() == before


def wait_for_line(process: subprocess.Popen, text: str, timeout: float) -> None:
    """Read the process's stdout until a line contains `text`; fails (with its stderr) when
    it exits first or `timeout` passes."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, process.stdout), lines.put("")],
                     daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise AssertionError(f"no {text!r} within {timeout} s") from None
        if not line:
            raise AssertionError(f"exited before {text!r}: {process.stderr.read()}")
        if text in line:
            return


@writable
@pytest.mark.parametrize("command, ready", [
    (["wpk.runtime.server", "--tier", "cloud", "--port", "0"], "ready on"),
    (["wpk.deploy.cli", "--local", "--port", "0"], "entry:"),
])
def test_a_tier_and_a_local_deployment_hold_the_limit_while_they_run(plans, command, ready):
    before = free_of_lower_limits()
    process = subprocess.Popen([sys.executable, "-m", command[0], str(plans["mlp"]),
                                *command[1:], "--threads", "1",
                                "--cpu-latency-us", str(LIMIT_US)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(process, ready, timeout=60)
        assert current_limit() == LIMIT_US
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert current_limit() == before
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("value", [-1, 2**31])
def test_out_of_range_limits_are_refused(value):
    with pytest.raises(WpkError, match=rf"--cpu-latency-us {value}: expected 0 to"):
        CpuLatencyLimit(value)


def test_a_device_that_cannot_be_written_is_named(tmp_path: Path):
    with pytest.raises(WpkError, match=rf"cannot open {tmp_path} \(Is a directory\)"):
        CpuLatencyLimit(0, tmp_path)
    assert current_limit(tmp_path / "missing") is None


@pytest.mark.parametrize("command, message", [
    (["wpk.runtime.server", "PLAN", "--tier", "cloud", "--cpu-latency-us", "-1"],
     "argument --cpu-latency-us: -1"),
    (["wpk.deploy.cli", "PLAN", "--bundle", "OUT", "--cpu-latency-us", "0"],
     "--cpu-latency-us: only for --local"),
])
def test_cli_misuse_is_one_line(plans, tmp_path, command, message):
    command = [str(plans["mlp"]) if a == "PLAN" else str(tmp_path / "b") if a == "OUT" else a
               for a in command]
    result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 or "usage:" in result.stderr
