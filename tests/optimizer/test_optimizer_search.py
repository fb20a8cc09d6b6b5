"""Search strategies and the tuning log. The objective here is a fixed function of the
configuration (no timing in unit tests): a schedule-like landscape with one good region."""
import math

import numpy as np
import pytest

from wpk.optimizer.database import TuningLog
from wpk.optimizer.search import Evaluator, GeneticSearch, RandomSearch, ReinforceSearch
from wpk.optimizer.space import Knob, Space


def landscape() -> tuple[Space, callable]:
    space = Space([Knob("tile", (1, 2, 4, 8, 16, 32)), Knob("order", ("a", "b", "c")),
                   Knob("vec", (False, True)), Knob("unroll", (1, 2, 4, 8)),
                   Knob("threads", (1, 2))])

    def cost(config) -> float:
        ms = 10.0 / config["threads"] * (2.0 if not config["vec"] else 1.0)
        ms *= 1 + 0.3 * abs(math.log2(config["tile"]) - 3)       # best tile: 8
        ms *= {"a": 1.6, "b": 1.0, "c": 1.3}[config["order"]]
        ms *= 1 + 0.1 * abs(math.log2(config["unroll"]) - 1)     # best unroll: 2
        return ms

    return space, cost


def median_cost(space, cost) -> float:
    return float(np.median([cost(c) for c in space]))


@pytest.mark.parametrize("strategy", [GeneticSearch, ReinforceSearch, RandomSearch])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strategies_beat_the_median_within_budget(strategy, seed):
    space, cost = landscape()
    evaluator = Evaluator("toy", cost, max_trials=24)
    best = strategy(seed=seed).search(space, evaluator)
    assert evaluator.measured <= 24
    assert best is not None and best.ms < median_cost(space, cost)
    curve = evaluator.best_curve()
    assert curve == sorted(curve, reverse=True) and curve[-1] == best.ms


@pytest.mark.parametrize("strategy", [GeneticSearch, ReinforceSearch])
def test_learning_strategies_find_near_optimal_on_average(strategy):
    space, cost = landscape()
    optimum = min(cost(c) for c in space)
    found = [strategy(seed=s).search(space, Evaluator("toy", cost, max_trials=60)).ms
             for s in range(4)]
    assert np.mean(found) < 1.35 * optimum   # random picks are 3x worse on average


def test_tuning_log_is_reused_by_a_second_run(tmp_path):
    space, cost = landscape()
    path = tmp_path / "tuning.jsonl"
    calls = []

    def measure(config):
        calls.append(config)
        return cost(config)

    first = Evaluator("op:conv", measure, hardware="hw", log=TuningLog(path), max_trials=10)
    RandomSearch(seed=3).search(space, first)
    assert first.measured == 10 and len(calls) == 10
    assert len(path.read_text().splitlines()) == 10

    calls.clear()
    second = Evaluator("op:conv", measure, hardware="hw", log=TuningLog(path), max_trials=10)
    best = RandomSearch(seed=3).search(space, second)   # same proposals: all from the log
    reused = [t for t in second.history if t.reused]
    assert len(reused) >= 10 and best.ms <= first.best.ms
    assert all(t.config not in calls for t in reused)
    assert TuningLog(path).best("op:conv", "hw")[1] == pytest.approx(first.best.ms)
    # other hardware or another operator: nothing to reuse
    assert TuningLog(path).lookup("op:conv", "other", first.best.config) is None


def test_failing_candidates_are_infinitely_slow_and_not_logged(tmp_path):
    space = Space([Knob("x", (0, 1, 2, 3))])

    def measure(config):
        if config["x"] == 0:
            raise RuntimeError("does not build")
        return float(config["x"])

    log = TuningLog(tmp_path / "log.jsonl")
    evaluator = Evaluator("t", measure, log=log, max_trials=4)
    best = RandomSearch(seed=0).search(space, evaluator)
    assert best.ms == 1.0 and len(log) == 3


def test_time_budget_stops_search():
    space, cost = landscape()
    evaluator = Evaluator("toy", cost, max_seconds=0.0)
    assert RandomSearch().search(space, evaluator) is None
    assert evaluator.measured == 0
