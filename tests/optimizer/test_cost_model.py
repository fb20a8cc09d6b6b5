"""The cost model learned from the tuning log, and the searches that screen with it.

The measured function here is a fixed synthetic one (a log-time additive in each knob's choice
plus pairwise interactions, like a schedule's tile and unroll knobs), so that "found the best
in fewer measurements" is exact and repeatable; the real kernels' curves are in
benchmarks/search_strategies.py."""
from __future__ import annotations

import math

import numpy as np
import pytest

from wpk.optimizer.cost_model import CostModel
from wpk.optimizer.database import TuningLog
from wpk.optimizer.search import Evaluator, GeneticSearch, ReinforceSearch
from wpk.optimizer.space import Knob, Space

KNOBS, CHOICES = 6, 4
SPACE = Space([Knob(f"k{i}", tuple(range(CHOICES))) for i in range(KNOBS)])
_rng = np.random.default_rng(42)
MAIN = _rng.normal(0, 0.3, (KNOBS, CHOICES))
PAIRS = _rng.normal(0, 0.15, (KNOBS, KNOBS, CHOICES, CHOICES))


def measured_ms(config: dict, scale: float = 1.0) -> float:
    idx = [config[f"k{i}"] for i in range(KNOBS)]
    log_ms = sum(MAIN[i, idx[i]] for i in range(KNOBS))
    log_ms += sum(PAIRS[i, j, idx[i], idx[j]] for i in range(KNOBS) for j in range(i + 1, KNOBS))
    return scale * math.exp(log_ms)


ALL = list(SPACE)
TRUE_ORDER = sorted(ALL, key=measured_ms)
BEST_MS = measured_ms(TRUE_ORDER[0])


def _rank_of_true_best(ranked: list[dict]) -> int:
    return ranked.index(TRUE_ORDER[0])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def test_a_model_fitted_on_a_tenth_of_the_space_ranks_all_of_it():
    model = CostModel(SPACE)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(ALL), size=len(ALL) // 10, replace=False):
        model.observe("task", ALL[i], measured_ms(ALL[i]))
    assert model.fit("task")
    predicted = model.predict_log_ms(ALL)
    truth = np.log([measured_ms(c) for c in ALL])
    assert _spearman(predicted, truth) > 0.9
    assert _rank_of_true_best(model.rank("task", ALL)) < len(ALL) // 50


def test_too_few_measurements_leave_the_order_unchanged():
    model = CostModel(SPACE)
    for config in ALL[:3]:
        model.observe("task", config, measured_ms(config))
    assert not model.fit("task")
    assert model.rank("task", ALL[10:20]) == ALL[10:20]


def test_values_outside_the_space_teach_nothing_and_rank_last():
    model = CostModel(SPACE)
    model.observe("task", {**ALL[0], "k0": 99}, 1.0)
    model.observe("task", ALL[1], math.inf)          # a failed build
    assert model.samples("task") == 0
    for config in ALL[:8]:
        model.observe("task", config, measured_ms(config))
    assert model.rank("task", [{**ALL[0], "k0": 99}, ALL[5]])[-1]["k0"] == 99


def test_another_tasks_log_ranks_a_task_never_measured():
    """Same knobs, same machine, another shape (times three, 10 % noise): what it teaches is
    which choices are fast relative to the others."""
    log = TuningLog(None)
    noise = np.random.default_rng(1)
    for config in ALL[::7]:
        log.add("conv 28x28", "cpu-x", config, measured_ms(config, 3.0)
                * math.exp(noise.normal(0, 0.1)))
    log.add("other knobs", "cpu-x", {"threads": 2}, 1.0)
    log.add("conv 28x28", "another machine", ALL[0], 1e-6)
    model = CostModel(SPACE)
    assert model.observe_log(log, "cpu-x") == len(ALL[::7])
    assert model.samples("conv 56x56") == 0
    assert _rank_of_true_best(model.rank("conv 56x56", ALL)) < len(ALL) // 20


def _mean_best(strategy, learn: bool, trials: int, log_of_other_task: bool = False) -> float:
    found = []
    for seed in range(12):
        log = TuningLog(None)
        if log_of_other_task:
            for config in ALL[::7]:
                log.add("other", "local", config, measured_ms(config, 3.0))
        evaluator = Evaluator("task", measured_ms, log=log, max_trials=trials, learn=learn)
        strategy(seed=seed).search(SPACE, evaluator)
        found.append(evaluator.best.ms / BEST_MS)
    return float(np.mean(found))


@pytest.mark.parametrize("strategy", [GeneticSearch, ReinforceSearch])
def test_screening_with_the_model_finds_faster_configurations(strategy):
    without, with_model = _mean_best(strategy, False, 48), _mean_best(strategy, True, 48)
    assert with_model < 0.85 * without, (without, with_model)


@pytest.mark.parametrize("strategy", [GeneticSearch, ReinforceSearch])
def test_a_log_of_another_task_pays_off_from_the_first_measurements(strategy):
    without = _mean_best(strategy, False, 12, log_of_other_task=True)
    with_model = _mean_best(strategy, True, 12, log_of_other_task=True)
    assert with_model < 0.75 * without, (without, with_model)


def test_the_shortlist_skips_measured_and_invalid_configurations():
    space = Space(SPACE.knobs, valid=lambda c: c["k0"] != 3)
    evaluator = Evaluator("task", measured_ms, max_trials=100)
    for config in ALL[:6]:
        evaluator(config)
    proposals = ALL[:6] + [c for c in ALL[6:60] if c["k0"] == 3] + ALL[200:210] + ALL[200:202]
    picked = evaluator.shortlist(space, proposals, 20, np.random.default_rng(0))
    keys = [tuple(c.values()) for c in picked]
    assert len(picked) == len(set(keys)) == len([c for c in ALL[200:210] if c["k0"] != 3])
    assert all(c["k0"] != 3 and not evaluator.seen(c) for c in picked)


@pytest.mark.parametrize("strategy", [GeneticSearch, ReinforceSearch])
def test_a_seed_gives_the_same_search_every_time(strategy):
    """deap draws from the global `random`; the GA seeds it for its own search only."""
    import random

    histories = []
    for _ in range(2):
        random.seed(len(histories))          # whatever the caller did to the global state
        evaluator = Evaluator("task", measured_ms, max_trials=30)
        strategy(seed=3).search(SPACE, evaluator)
        histories.append([tuple(t.config.values()) for t in evaluator.history])
    assert histories[0] == histories[1]

