"""Fixtures and helpers shared by every test area: the example models, written once per
session; a one-tier plan whose slice is saved for OpenVINO."""
from __future__ import annotations

from pathlib import Path

import onnx
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


def openvino_plan(model: onnx.ModelProto, tmp_path: Path) -> Path:
    """A one-tier plan ("edge") of `model` whose slice the optimizer gave to OpenVINO
    (forced, nothing measured): the plan directory."""
    from wpk.optimizer import pipeline
    from wpk.partitioner.api import partition
    from wpk.plan import load_plan

    onnx.save(model, str(tmp_path / "model.onnx"))
    plan_dir = tmp_path / "plan"
    partition(tmp_path / "model.onnx", ["edge"], privacy="none", out_dir=plan_dir,
              use_calibration=False)
    plan = load_plan(plan_dir)
    pipeline.save_openvino(model, plan_dir / "optimized" / "edge")
    plan.tier("edge").optimized = "optimized/edge"
    plan.save(plan_dir)
    return plan_dir
