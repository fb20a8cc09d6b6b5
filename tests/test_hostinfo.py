"""wpk.hostinfo: one set of machine facts behind every stored machine identity.

The tuning log's hardware id and the calibration cache's key are on disk already: they are
recomputed here the way earlier versions did, and must come out the same."""
from __future__ import annotations

import json
import os
import platform

import onnxruntime

from wpk.hostinfo import MachineFacts, host_info, machine_facts
from wpk.optimizer.measure import hardware_id
from wpk.partitioner import costs


def _legacy_hardware_id() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()} ort{onnxruntime.__version__}"


def test_the_stored_identities_keep_the_formats_already_on_disk():
    assert hardware_id() == _legacy_hardware_id()
    assert costs._machine_key() == (f"{platform.machine()}|{platform.processor()}|"
                                    f"{os.cpu_count()}|{onnxruntime.__version__}")


def test_every_identity_comes_from_the_same_facts():
    facts = machine_facts()
    assert hardware_id() == facts.hardware_id()
    assert costs._machine_key() == facts.calibration_key()
    host = host_info()
    assert host["machine"] == facts.machine
    assert host["logical_cores"] == (facts.logical_cores or 1)
    if facts.cpuinfo_model_name:
        assert host["cpu"] == facts.cpu


def test_both_formats_from_given_facts():
    arm = MachineFacts("aarch64", "", None, 4, "1.17.0")
    assert arm.hardware_id() == "aarch64 x4 ort1.17.0"
    assert arm.calibration_key() == "aarch64||4|1.17.0"
    xeon = MachineFacts("x86_64", "x86_64", "Intel(R) Xeon(R) Gold", 8, "1.20.1")
    assert xeon.hardware_id() == "Intel(R) Xeon(R) Gold x8 ort1.20.1"
    assert xeon.calibration_key() == "x86_64|x86_64|8|1.20.1"


def test_a_calibration_cached_under_the_old_key_is_found(monkeypatch, tmp_path):
    """A cache written before the facts were shared still matches: no re-measurement."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = (f"{platform.machine()}|{platform.processor()}|{os.cpu_count()}|"
           f"{onnxruntime.__version__}")
    path = tmp_path / "wpk" / "calibration.json"
    path.parent.mkdir(parents=True)
    factors = {"conv": 0.123, "depthwise": 0.05, "gemm": 0.2, "memory": 0.4}
    path.write_text(json.dumps({"version": costs.CALIBRATION_VERSION, "machine": key,
                                "factors": factors}))
    efficiency = costs.calibrate()
    assert efficiency.source == "calibrated" and dict(efficiency.factors) == factors
