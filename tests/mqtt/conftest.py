from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from wpk.examples import mlp
from wpk.partitioner.cli import main as partition_main
from wpk.plan import load_plan

from .helpers import FEATURES, MOSQUITTO, Deployment, Mosquitto

@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "sensor_mlp.onnx"
    onnx.save(mlp(features=FEATURES, hidden=(128, 64), classes=10), str(path))
    return path


@pytest.fixture(scope="session")
def plan_dir(model_path) -> Path:
    """A real 3-tier plan by wpk-partition (pins keep every tier busy on this tiny model)."""
    out = model_path.parent / "plan"
    code = partition_main([str(model_path), "-o", str(out), "--no-calibrate",
                           "--pin", "gemm_3=device", "--pin", "gemm_7=edge",
                           "--pin", "softmax_12=cloud", "--deliver-to", "cloud"])
    assert code == 0 and len(load_plan(out).tiers) == 3
    return out


@pytest.fixture(scope="session")
def reference(model_path):
    """The whole model under ONNX Runtime: what every result must equal."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def run(features: np.ndarray) -> np.ndarray:
        return session.run(None, {"features": features.reshape(1, FEATURES)})[0]
    return run


@pytest.fixture
def broker(tmp_path):
    if not (shutil.which("mosquitto") or os.path.exists(MOSQUITTO)):
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    server = Mosquitto(tmp_path / "broker")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pipeline(plan_dir):
    """One 3-tier deployment shared by the tests that do not stop it."""
    deployment = Deployment(plan_dir).start()
    yield deployment
    deployment.kill()


@pytest.fixture
def own_pipeline(plan_dir):
    """A deployment of the test's own, not started: the test starts and kills it."""
    deployment = Deployment(plan_dir)
    yield deployment
    deployment.kill()
