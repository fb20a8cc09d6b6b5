"""wpk-privacy: the table for every candidate cut, one-line errors."""
import json

import numpy as np
import onnx
import pytest

from wpk.examples import resnet_like
from wpk.partitioner.privacy_cli import main


@pytest.fixture
def model_and_samples(tmp_path):
    model = tmp_path / "small.onnx"
    onnx.save(resnet_like(image_size=16, width=4, classes=5), model)
    samples = tmp_path / "samples.npz"
    np.savez(samples, image=np.random.default_rng(0).random((20, 3, 16, 16)).astype(np.float32))
    return model, samples


def test_table_and_json_file(model_and_samples, tmp_path, capsys):
    model, samples = model_and_samples
    out = tmp_path / "leakage.json"
    assert main([str(model), "--calibration-data", str(samples), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "conv_2_out" in text and "(input)" in text and "SYNTHETIC" not in text
    data = json.loads(out.read_text())
    assert data["samples"] == 20 and not data["synthetic"]
    assert data["tensors"][0]["dcor"] == pytest.approx(1.0)
    assert main([str(model), "--calibration-data", str(samples), "-o", str(out)]) == 2
    assert "already" in capsys.readouterr().err or out.exists()


def test_synthetic_fallback_is_labelled_and_warned(model_and_samples, capsys):
    model, _ = model_and_samples
    assert main([str(model), "--samples", "12", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["synthetic"] is True
    assert "wpk: warning: no --calibration-data" in captured.err


def test_bad_calibration_file_is_one_line(model_and_samples, tmp_path, capsys):
    model, _ = model_and_samples
    bad = tmp_path / "bad.npz"
    bad.write_text("{}")
    assert main([str(model), "--calibration-data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.npz: not an .npz file" in err
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, pixels=np.zeros((10, 3, 16, 16), np.float32))
    assert main([str(model), "--calibration-data", str(wrong)]) == 2
    assert "no array for model input 'image'" in capsys.readouterr().err
