"""How the optimizer decides from interleaved rounds: a gain is kept only where a second,
longer measurement pooled with the first still shows it across the 95 % interval; a gain the
noise hides is reported as such, and the default is kept."""
import numpy as np

from wpk.optimizer.measure import Ratio, compare_ratio
from wpk.optimizer.pipeline import KEEP_FACTOR, decide


def _ratio(speedups):
    return Ratio(list(speedups), 10.0, 10.0 / float(np.median(speedups)))


def _candidates(*keys):
    return {k: {} for k in keys}


def test_a_steady_gain_is_kept_with_its_interval():
    measured = {"custom-ops": _ratio([1.12, 1.10, 1.14, 1.11, 1.13, 1.12])}
    again = lambda key, rounds: _ratio([1.11, 1.12, 1.13, 1.10, 1.12, 1.12])  # noqa: E731
    cands = _candidates("custom-ops")
    key, reason, noisy = decide(measured, again, cands)
    assert (key, noisy) == ("custom-ops", False)
    assert "95 % interval" in reason and cands["custom-ops"]["confirmed"]
    assert cands["custom-ops"]["rounds"] == 12 and cands["custom-ops"]["speedup_low"] > 1.0


def test_a_gain_within_the_noise_is_reported_and_not_kept():
    # a loaded machine: rounds from 0.8x to 1.5x, median 1.1x
    spread = [0.8, 1.5, 0.85, 1.4, 1.1, 0.9, 1.35, 1.12]
    measured = {"openvino": _ratio(spread)}
    key, reason, noisy = decide(measured, lambda key, rounds: _ratio(spread), _candidates(
        "openvino"))
    assert (key, noisy) == ("default", True)
    assert reason.startswith("too noisy to decide: openvino")


def test_a_lucky_first_measurement_is_not_kept():
    measured = {"openvino": _ratio([1.2] * 6), "tuned": _ratio([1.06] * 6)}
    second = {"openvino": [0.97, 0.99, 0.98, 1.0, 0.99, 0.98] * 2, "tuned": [1.0] * 12}
    key, reason, noisy = decide(measured, lambda key, rounds: _ratio(second[key]),
                                _candidates("openvino", "tuned"))
    assert key == "default" and not noisy
    assert "did not hold" in reason and "openvino" in reason


def test_a_candidate_below_the_factor_is_never_remeasured():
    measured = {"tuned": _ratio([KEEP_FACTOR - 0.02] * 8)}

    def never(key, rounds):
        raise AssertionError("remeasured")
    assert decide(measured, never, _candidates("tuned"))[0] == "default"


def test_interleaved_ratio_sees_a_real_difference():
    def busy(n):
        return lambda: sum(i * i for i in range(n))
    ratio = compare_ratio(busy(40000), busy(20000), rounds=6, repeats=5)
    assert 1.4 < ratio.speedup < 2.8 and ratio.interval[0] > 1.2
