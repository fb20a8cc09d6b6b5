from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import MOSQUITTO, KServeServer, Mosquitto  # noqa: E402

from wpk.examples import mlp  # noqa: E402

if not (shutil.which("mosquitto") or os.path.exists(MOSQUITTO)):
    pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)",
                allow_module_level=True)

MODEL_NAME = "mlp"
FEATURES = 64


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "mlp.onnx"
    onnx.save(mlp(features=FEATURES, hidden=(128, 64), classes=10), str(path))
    return path


@pytest.fixture(scope="session")
def reference(model_path):
    """The whole model under ONNX Runtime: what every result must equal."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def run(features: np.ndarray) -> np.ndarray:
        return session.run(None, {"features": features.reshape(1, FEATURES)})[0]
    return run


@pytest.fixture
def broker(tmp_path):
    server = Mosquitto(tmp_path / "broker")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pipeline(model_path):
    server = KServeServer(model_path, MODEL_NAME)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def slow_pipeline(model_path):
    """20 ms per request: keeps a stream in flight long enough to interrupt it."""
    server = KServeServer(model_path, MODEL_NAME, delay_ms=20)
    server.start()
    yield server
    server.kill()
