"""Leakage figures: the estimators on cases with known answers, and the passes on a model."""
import numpy as np
import onnx
import pytest

from wpk.errors import WpkError
from wpk.examples import resnet_like
from wpk.graph import Graph
from wpk.partitioner import leakage
from wpk.partitioner import leakage_stats as stats


def dist(x: np.ndarray) -> np.ndarray:
    return stats.distances(x @ x.T)


def test_dcor_of_independent_data_is_near_zero():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((300, 10)), rng.standard_normal((300, 30))
    assert stats.dcor(dist(x), dist(y)) < 0.12
    low, high = stats.dcor_band(dist(x), dist(y), reps=50)
    assert low <= 0.05 and high < 0.25


def test_dcor_of_identical_or_similar_data_is_one():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 12))
    rotation, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    assert stats.dcor(dist(x), dist(x)) == pytest.approx(1.0, abs=1e-9)
    y = 3.0 * x @ rotation + 5.0                    # scaled, rotated and shifted
    assert stats.dcor(dist(x), dist(y)) == pytest.approx(1.0, abs=1e-6)
    low, high = stats.dcor_band(dist(x), dist(y), reps=20)
    assert low > 0.999


def test_dcor_grows_with_dependence():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 5))
    noise = rng.standard_normal((300, 5))
    values = [stats.dcor(dist(x), dist(x + s * noise)) for s in (0.1, 1.0, 10.0)]
    assert values[0] > values[1] > values[2]


def test_ridge_decoder_is_exact_on_an_invertible_linear_map():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 20))
    z = x @ rng.standard_normal((20, 20)) + 1.0     # invertible map plus an offset
    train, test = np.arange(100), np.arange(100, 200)
    guess = stats.ridge_reconstruct(z @ z.T, x, train, test)
    assert np.abs(guess - x[test]).max() < 1e-4
    assert stats.psnr(x[test], guess, float(np.ptp(x))) > 80


def test_ridge_decoder_of_noise_predicts_the_mean():
    rng = np.random.default_rng(4)
    x, z = rng.standard_normal((120, 8)), rng.standard_normal((120, 50))
    train, test = np.arange(60), np.arange(60, 120)
    guess = stats.ridge_reconstruct(z @ z.T, x, train, test)
    assert np.abs(guess - x[train].mean(axis=0)).max() < 0.3


def test_ssim_is_one_on_identical_images_and_low_on_noise():
    rng = np.random.default_rng(5)
    images = rng.random((4, 3, 20, 20))
    assert stats.ssim_images(images, images, 1.0) == pytest.approx(1.0)
    assert stats.ssim_images(images, rng.random(images.shape), 1.0) < 0.1
    assert stats.ssim_vectors(images.reshape(4, -1), images.reshape(4, -1), 1.0) == \
        pytest.approx(1.0)


def small_model() -> Graph:
    return Graph.load(resnet_like(image_size=16, width=4, classes=5), name="small")


def test_measure_covers_every_candidate_tensor_in_bounded_passes():
    graph = small_model()
    samples = leakage.synthetic_samples(graph, 24)
    names = leakage.candidate_tensors(graph)
    assert len(leakage.plan_passes(graph, names, 24, budget=24 * 4 * 300)) > 3
    report = leakage.measure(graph, samples, "synthetic", reps=10)
    assert list(report.tensors) == names
    first = report.tensors[graph.inputs[0]]
    assert first.dcor == pytest.approx(1.0) and first.producer is None
    assert all(0 <= t.dcor_low <= t.dcor_high <= 1 for t in report.tensors.values())
    assert report.to_json()["synthetic"] is True


def test_small_pass_budget_gives_the_same_grams():
    graph = small_model()
    samples = leakage.synthetic_samples(graph, 10)
    names = leakage.candidate_tensors(graph)[:6]
    one = leakage.fetch_grams(graph, samples, names)
    many = leakage.fetch_grams(graph, samples, names, budget=1)   # each spilled to disk
    for name in names:
        np.testing.assert_allclose(one[name], many[name], rtol=1e-4,
                                   atol=1e-5 * np.abs(one[name]).max())  # float32 outputs


def test_bounds_and_calibration_files(tmp_path):
    assert leakage.parse_bound("dcor=0.3") == ("dcor", 0.3)
    for bad in ("dcor", "size=3", "psnr=x"):
        with pytest.raises(WpkError, match="max_leakage"):
            leakage.parse_bound(bad)
    graph = small_model()
    path = tmp_path / "samples.npz"
    np.savez(path, other=np.zeros((10, 3, 16, 16), np.float32))
    with pytest.raises(WpkError, match="no array for model input"):
        leakage.load_samples(path, graph)
    np.savez(path, **{graph.inputs[0]: np.zeros((10, 3, 16, 16), np.float32)})
    assert leakage.load_samples(path, graph)[graph.inputs[0]].shape == (10, 1, 3, 16, 16)
    onnx.save(graph.model, tmp_path / "m.onnx")
    assert leakage.sample_shapes(tmp_path / "m.onnx", path) == {graph.inputs[0]: (1, 3, 16, 16)}


def test_a_constant_tensor_decodes_to_the_mean_and_leaks_nothing():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 6))
    constant = np.ones((40, 7)) * 3.0
    train, test = np.arange(20), np.arange(20, 40)
    with np.errstate(all="raise"):
        guess = stats.ridge_reconstruct(constant @ constant.T, x, train, test)
    np.testing.assert_allclose(guess, np.repeat(x[train].mean(axis=0)[None], 20, axis=0))
    assert stats.dcor(dist(x), dist(constant)) == 0.0
