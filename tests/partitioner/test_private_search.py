"""A leakage bound forbids some tensors on the device's link; the search stays exact."""
import dataclasses

import numpy as np
import pytest

from wpk.errors import WpkError
from wpk.partitioner import search
from tests.partitioner.test_search import random_problem


def with_private(rng, problem: search.Problem) -> search.Problem:
    names = [t.name for t in problem.tensors]
    chosen = rng.random(len(names)) < rng.uniform(0.1, 0.6)
    return dataclasses.replace(problem, private=frozenset(n for n, c in zip(names, chosen) if c))


def crosses_device_link(problem: search.Problem, tiers) -> set[str]:
    return set(search.evaluate(problem, tiers).forward_tensors[0])


@pytest.mark.parametrize("n_tiers", [2, 3])
def test_min_latency_with_private_tensors_matches_brute_force(n_tiers):
    rng = np.random.default_rng(40 + n_tiers)
    solved = infeasible = 0
    for trial in range(60):
        problem = with_private(rng, random_problem(
            rng, int(rng.integers(2, 7)), n_tiers, deliver_to=int(rng.integers(n_tiers)),
            privacy=bool(trial % 2)))
        try:
            best = search.brute_force(problem)
        except WpkError:
            infeasible += 1
            with pytest.raises(WpkError):
                search.min_latency(problem)
            continue
        found = search.min_latency(problem)
        assert search.feasible(problem, found)
        assert not crosses_device_link(problem, found) & problem.private
        assert search.evaluate(problem, found).latency_ms == pytest.approx(best.latency_ms,
                                                                            abs=1e-5)
        solved += 1
    assert solved > 20 and infeasible > 0


def test_throughput_with_private_tensors_is_exact_on_chains():
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(60):
        n_tiers = int(rng.integers(2, 4))
        problem = with_private(rng, random_problem(
            rng, int(rng.integers(2, 8)), n_tiers, chain=True,
            deliver_to=int(rng.integers(n_tiers))))
        try:
            best = search.brute_force(problem, key=lambda e: e.bottleneck_ms)
        except WpkError:
            with pytest.raises(WpkError):
                search.max_throughput(problem)
            continue
        found = search.evaluate(problem, search.max_throughput(problem))
        assert search.feasible(problem, found.tiers)
        assert found.bottleneck_ms == pytest.approx(best.bottleneck_ms, abs=1e-6)
        checked += 1
    assert checked > 20


def test_feasible_refuses_a_private_tensor_on_the_device_link():
    problem = search.Problem(
        np.ones((2, 2)), [search.TensorEdge("x", 4, -1, (0,)),
                          search.TensorEdge("a", 4, 0, (1,)),
                          search.TensorEdge("y", 4, 1, (), True)],
        np.ones(1), np.zeros(1), np.zeros(1, bool), np.zeros(2, int), np.ones(2, int),
        private=frozenset({"a"}))
    assert search.feasible(problem, [0, 0]) and search.feasible(problem, [1, 1])
    assert not search.feasible(problem, [0, 1])


def test_throughput_objective_falls_back_to_the_min_cut_plan_when_no_ordered_cut_fits():
    rng = np.random.default_rng(0)
    fallbacks = 0
    for _ in range(200):
        problem = with_private(rng, random_problem(rng, int(rng.integers(3, 8)), 2,
                                                   deliver_to=int(rng.integers(2))))
        try:
            search.min_latency(problem)
        except WpkError:
            continue
        found = search.solve(problem, "throughput")
        assert search.feasible(problem, found)
        try:
            search.max_throughput(problem)
        except WpkError:
            fallbacks += 1
    assert fallbacks > 0
