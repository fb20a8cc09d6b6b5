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


def test_conv_attack_reports_the_stronger_decoder_and_partition_reads_the_file(
        model_and_samples, tmp_path, capsys):
    """--attack conv trains the learned decoder too: no figure falls below ridge's, each
    tensor names the decoder behind it, and wpk-partition --leakage plans with the file."""
    pytest.importorskip("torch")
    from wpk.partitioner.cli import main as partition

    model, samples = model_and_samples
    ridge, conv = tmp_path / "ridge.json", tmp_path / "conv.json"
    assert main([str(model), "--calibration-data", str(samples), "-o", str(ridge),
                 "--json"]) == 0
    assert main([str(model), "--calibration-data", str(samples), "-o", str(conv),
                 "--attack", "conv", "--decoder-steps", "10", "--json"]) == 0
    capsys.readouterr()
    by_ridge = {t["tensor"]: t for t in json.loads(ridge.read_text())["tensors"]}
    data = json.loads(conv.read_text())
    assert data["attack"] == "conv"
    for t in data["tensors"]:
        assert t["psnr_db"] >= by_ridge[t["tensor"]]["psnr_db"] - 1e-9
        assert t["decoder"] in ("ridge", "conv")
        assert t["dcor"] == pytest.approx(by_ridge[t["tensor"]]["dcor"])
    out = tmp_path / "plan"
    assert partition([str(model), "--leakage", str(conv), "--max-leakage", "dcor=0.99",
                      "--no-verify", "-o", str(out), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["objective"]["leakage_data"] == str(samples)


def test_leakage_file_of_another_model_is_refused_in_one_line(model_and_samples, tmp_path,
                                                               capsys):
    from wpk.partitioner.cli import main as partition

    model, _ = model_and_samples
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": "x", "samples": 10, "source": "s.npz",
                                 "tensors": [{"tensor": "nowhere", "shape": [1], "dcor": 0.5,
                                              "dcor_low": 0.4, "dcor_high": 0.6,
                                              "psnr_db": 10, "ssim": 0.1}]}))
    assert partition([str(model), "--leakage", str(other), "-o", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "measured on another model" in err and "'nowhere'" in err
    garbled = tmp_path / "garbled.json"
    garbled.write_text(json.dumps({"model": "x"}))
    assert partition([str(model), "--leakage", str(garbled), "-o", str(tmp_path / "q")]) == 2
    assert "not a leakage report" in capsys.readouterr().err


def test_report_draws_leakage_beside_latency(model_and_samples, tmp_path, capsys):
    """--report with leakage measured: the figure gains the leakage row and the front."""
    pytest.importorskip("matplotlib")
    from wpk.partitioner.cli import main as partition

    model, samples = model_and_samples
    plain, leaky = tmp_path / "plain.png", tmp_path / "leaky.png"
    assert partition([str(model), "--no-verify", "-o", str(tmp_path / "a"),
                      "--report", str(plain)]) == 0
    assert partition([str(model), "--calibration-data", str(samples), "--no-verify",
                      "-o", str(tmp_path / "b"), "--report", str(leaky)]) == 0
    from matplotlib import image

    assert image.imread(str(leaky)).shape[0] > image.imread(str(plain)).shape[0]
    assert image.imread(str(leaky)).shape[1] > image.imread(str(plain)).shape[1]
