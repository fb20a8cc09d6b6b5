"""Detection of structured sparsity already in a model's weights: each pattern found on a
model pruned by wpk-prune, by hand, and by torch.nn.utils.prune (where torch is present); a
dense model finds none, unstructured pruning is called unstructured."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from wpk.optimizer import prune as pruning
from wpk.optimizer.sparsity import detect, detect_matrix

from .sparse_models import small_net, weights, with_weight
from .test_prune import run_cli


def _found(model: onnx.ModelProto) -> dict[str, str]:
    return {layer.node: layer.summary for layer in detect(model)}


def _patterns(model: onnx.ModelProto, node: str) -> dict[str, float]:
    layer = next(l for l in detect(model) if l.node == node)
    return {f.pattern: f.fraction for f in layer.found}


def test_a_dense_model_finds_none():
    assert set(_found(small_net()).values()) == {"dense"}


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "1:16"])
def test_nm_pruned_by_wpk_is_found_with_its_own_n_and_m(pattern):
    pruned, layers = pruning.prune(small_net(), pruning.parse_pattern(pattern))
    found = _found(pruned)
    for layer in layers:
        assert found[layer.node] == (pattern if layer.pruned else "dense")
    n, m = map(int, pattern.split(":"))
    assert _patterns(pruned, "fc")[pattern] == pytest.approx(1 - n / m)


@pytest.mark.parametrize("width, ratio", [(16, 0.75), (32, 0.5), (8, 0.9)])
def test_tile_wise_pruned_by_wpk_is_found_with_its_width(width, ratio):
    pruned, layers = pruning.prune(small_net(), pruning.parse_pattern(f"tile:{width}"), ratio)
    for layer in layers:
        if layer.pruned:
            found = _patterns(pruned, layer.node)
            # where the outputs left after column pruning fit one tile, whole rows of B are
            # input channels: channel sparsity, which is what is reported
            outputs = layer.shape[1] if layer.op == "MatMul" else layer.shape[0]
            alive = outputs - int(outputs * ratio * pruning.COLUMN_SHARE)
            expected = f"tile:{width}" if alive > width else "channel"
            assert expected in found, (layer.node, found)
            assert found[expected] == pytest.approx(layer.sparsity)


def test_channel_block_and_unstructured_sparsity_made_by_hand():
    model = small_net()
    rng = np.random.default_rng(0)
    fc = weights(model)["fcw"]                   # MatMul B[K=1024, N=128]
    channel = fc.copy()
    channel[:, rng.choice(128, 32, replace=False)] = 0      # 32 output units
    channel[rng.choice(1024, 256, replace=False)] = 0       # 256 input positions
    found = _patterns(with_weight(model, "fcw", channel), "fc")
    assert list(found) == ["channel"]
    assert found["channel"] == pytest.approx((channel == 0).mean())

    blocks = fc.T.copy().reshape(16, 8, 128, 8)             # (outputs, K) in 8x8 blocks
    blocks *= rng.random((16, 128))[:, None, :, None] >= 0.6
    block = blocks.reshape(128, 1024).T
    found = _patterns(with_weight(model, "fcw", block), "fc")
    assert found.get("block:8x8") == pytest.approx((block == 0).mean())

    unstructured = np.where(rng.random(fc.shape) < 0.5, 0, fc)
    assert _found(with_weight(model, "fcw", unstructured))["fc"] == "unstructured"


def test_2_4_along_input_channels_channels_last_is_found():
    """NVIDIA's ASP groups a convolution's weights along Cin at each (kh, kw)."""
    model = small_net()
    conv = weights(model)["c3w"]                             # [64, 32, 3, 3]
    channels_last = np.moveaxis(conv, 1, -1).reshape(64, -1)
    mask = pruning.nm_mask(channels_last, 2, 4)
    pruned = np.moveaxis(np.where(mask, channels_last, 0).reshape(64, 3, 3, 32), -1, 1)
    layer = next(l for l in detect(with_weight(model, "c3w", pruned)) if l.node == "conv3")
    assert layer.summary == "2:4" and "channels-last" in layer.found[0].detail


def test_detect_matrix_of_a_dense_matrix_is_empty():
    assert detect_matrix(np.ones((8, 16), np.float32)) == []


def test_cli_detect_prints_a_line_per_model(tmp_path):
    pruned, _ = pruning.prune(small_net(), pruning.parse_pattern("2:4"))
    onnx.save(pruned, str(tmp_path / "p.onnx"))
    result = run_cli("p.onnx", "--detect", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "p.onnx: 3 of 5 weights hold structured sparsity (2:4)" in result.stdout
    onnx.save(small_net(), str(tmp_path / "d.onnx"))
    result = run_cli("d.onnx", "--detect", cwd=tmp_path)
    assert "d.onnx: 0 of 5 weights hold structured sparsity" in result.stdout


# --- models pruned by torch.nn.utils.prune --------------------------------------------------

def _torch_net(seed: int = 0):
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 64, 64), nn.ReLU(), nn.Linear(64, 10))


def _export(net, path: Path) -> onnx.ModelProto:
    import torch

    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 1, 8, 8),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"])
    return onnx.load(str(path))


def _by_weight(model: onnx.ModelProto) -> dict[str, str]:
    return {layer.weight: layer.summary for layer in detect(model)}


def _nm_mask_torch(weight, n: int, m: int):
    import torch

    matrix = weight.detach().reshape(weight.shape[0], -1).numpy()
    return torch.from_numpy(pruning.nm_mask(matrix, n, m).reshape(weight.shape)).float()


def test_torch_unstructured_l1_pruning_is_unstructured_and_the_dense_net_dense(tmp_path):
    net = _torch_net()
    assert set(_by_weight(_export(net, tmp_path / "dense.onnx")).values()) == {"dense"}
    from torch.nn.utils import prune

    prune.l1_unstructured(net[2], "weight", amount=0.5)
    prune.remove(net[2], "weight")
    found = _by_weight(_export(net, tmp_path / "l1.onnx"))
    assert found["2.weight"] == "unstructured" and found["0.weight"] == "dense"


@pytest.mark.parametrize("dim", [0, 1])
def test_torch_ln_structured_pruning_is_channel_sparsity(tmp_path, dim):
    net = _torch_net()
    from torch.nn.utils import prune

    prune.ln_structured(net[2], "weight", amount=0.5, n=2, dim=dim)   # out / in channels
    prune.ln_structured(net[5], "weight", amount=0.25, n=1, dim=dim)
    for module in (net[2], net[5]):
        prune.remove(module, "weight")
    model = _export(net, tmp_path / "ln.onnx")
    found = _by_weight(model)
    assert found["2.weight"] == "channel" and found["5.weight"] == "channel"
    layer = next(l for l in detect(model) if l.weight == "2.weight")
    assert layer.found[0].fraction == pytest.approx(0.5)


def test_torch_masks_in_2_4_and_tile_and_block_patterns_are_found(tmp_path):
    """torch.nn.utils.prune.custom_from_mask with the masks of each pattern: the mask is
    torch's, its pattern is found in the exported ONNX weights."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune

    net = _torch_net()
    prune.custom_from_mask(net[2], "weight", _nm_mask_torch(net[2].weight, 2, 4))
    linear = net[5].weight.detach().numpy()                           # [64, 2048] (out, K)
    prune.custom_from_mask(net[5], "weight",
                           torch.from_numpy(pruning.tile_mask(linear, 0.75, 16)).float())
    block = np.ones((10, 64), bool)
    block.reshape(5, 2, 32, 2)[np.arange(5), :, np.arange(5) * 3, :] = False
    prune.custom_from_mask(net[7], "weight", torch.from_numpy(block).float())
    for module in (net[2], net[5], net[7]):
        prune.remove(module, "weight")
    found = _by_weight(_export(net, tmp_path / "masks.onnx"))
    assert found["2.weight"] == "2:4"
    assert "tile:16" in found["5.weight"].split(", ")
    assert "block:2x2" in found["7.weight"].split(", ")
    assert found["0.weight"] == "dense"


def test_torch_2_4_fine_tuned_under_the_mask_stays_2_4(tmp_path):
    """Train a few steps with the mask fixed (torch's reparametrization): zeros stay zero."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune

    net = _torch_net()
    prune.custom_from_mask(net[5], "weight", _nm_mask_torch(net[5].weight, 2, 4))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    prune.remove(net[5], "weight")
    assert _by_weight(_export(net, tmp_path / "ft.onnx"))["5.weight"] == "2:4"


@pytest.mark.slow
def test_the_digits_example_runs_end_to_end(tmp_path):
    """examples/sparsity/digits.py, shortened (it asserts detection and the optimized model's
    outputs itself); needs torch and scikit-learn's bundled digits."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "WPK_TUNING_LOG": str(tmp_path / "tuning.jsonl")}
    result = subprocess.run([sys.executable, str(root / "examples" / "sparsity" / "digits.py"),
                             "--out", str(tmp_path / "out"), "--epochs", "3",
                             "--finetune-epochs", "1"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "hold structured sparsity (2:4)" in result.stdout
    assert "hold structured sparsity (tile:16)" in result.stdout
    assert "2:4 wpk-optimized: max abs difference vs ONNX Runtime" in result.stdout
