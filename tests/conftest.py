"""Fixtures shared by every test area: the example models, written once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from wpk.examples import write_examples


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    write_examples(directory)
    return directory


@pytest.fixture(scope="session")
def resnet_path(models_dir) -> Path:
    return models_dir / "resnet_like.onnx"


@pytest.fixture(scope="session")
def mobilenet_path(models_dir) -> Path:
    return models_dir / "mobilenet_like.onnx"


@pytest.fixture(scope="session")
def mlp_path(models_dir) -> Path:
    return models_dir / "mlp.onnx"
