"""The throughput search with dynamic batching stays exact: on chains it matches brute force
over every monotone assignment, on DAGs brute force over every cut along the topological
order (the cuts it searches), and both price a tier's batch by the rule of `tier_batches`."""
import dataclasses
import itertools

import numpy as np
import pytest

from wpk.errors import WpkError
from wpk.partitioner import search
from tests.partitioner.test_search import random_problem, tricky_problem


def with_batching(problem: search.Problem, rng, max_batch: int = 8) -> search.Problem:
    """`problem` with per-request times at batch `max_batch` (0.2 to 1.8 times the lone
    time per node: batching gains on some tiers, loses on others), some nodes that cannot batch and some
    tensors without the batch dimension."""
    gain = rng.uniform(0.2, 1.8, size=problem.node_ms.shape)
    tensors = [dataclasses.replace(t, carries_batch=bool(rng.random() > 0.2))
               for t in problem.tensors]
    return dataclasses.replace(problem, tensors=tensors, batched_ms=problem.node_ms * gain,
                               batchable=rng.random(problem.n_nodes) > 0.2,
                               max_batch=max_batch)


def topological_cuts(problem: search.Problem):
    """Every assignment that gives each tier a run of consecutive nodes, in order."""
    n, n_tiers = problem.n_nodes, problem.n_tiers
    for bounds in itertools.combinations_with_replacement(range(n + 1), n_tiers - 1):
        edges = (0, *bounds, n)
        tiers = np.zeros(n, dtype=int)
        for t in range(n_tiers):
            tiers[edges[t]:edges[t + 1]] = t
        if search.feasible(problem, tiers):
            yield tiers


def test_batching_is_exact_on_chains():
    rng = np.random.default_rng(31)
    checked = 0
    for _ in range(60):
        n_tiers = int(rng.integers(2, 4))
        problem = with_batching(random_problem(rng, int(rng.integers(1, 8)), n_tiers,
                                               chain=True, deliver_to=int(rng.integers(n_tiers))),
                                rng)
        best = search.brute_force(problem, key=lambda e: e.bottleneck_ms)
        found = search.evaluate(problem, search.max_throughput(problem))
        assert search.feasible(problem, found.tiers)
        assert found.bottleneck_ms == pytest.approx(best.bottleneck_ms, abs=1e-6)
        checked += int(best.tier_batch.max() > 1)
    assert checked > 10        # the optimum often batches some tier


@pytest.mark.parametrize("n_tiers", [2, 3, 4])
def test_batching_is_exact_over_topological_cuts_of_dags(n_tiers):
    """On DAGs (tensors read by several nodes, outputs read later, inputs without the batch
    dimension, pins) the DP finds the best of the cuts it searches."""
    rng = np.random.default_rng(40 + n_tiers)
    checked = 0
    for _ in range(50):
        problem = with_batching(tricky_problem(rng, int(rng.integers(1, 8)), n_tiers), rng,
                                int(rng.integers(2, 17)))
        options = [search.evaluate(problem, t) for t in topological_cuts(problem)]
        if not options:
            with pytest.raises(WpkError):
                search.max_throughput(problem)
            continue
        best = min(e.bottleneck_ms for e in options)
        found = search.evaluate(problem, search.max_throughput(problem))
        assert found.bottleneck_ms == pytest.approx(best, abs=1e-6)
        # among those as good, the lowest lone-request latency
        tied = [e.latency_ms for e in options if e.bottleneck_ms <= best + 1e-6]
        assert found.latency_ms <= min(tied) + 1e-6
        checked += 1
    assert checked > 20


def test_a_tier_batches_only_where_every_node_and_every_crossing_tensor_allows():
    """Three nodes in a chain, x -> a -> b -> c (output). b cannot batch; tensor a has no
    batch dimension."""
    tensors = [search.TensorEdge("x", 10, -1, (0,)), search.TensorEdge("a", 10, 0, (1,)),
               search.TensorEdge("b", 10, 1, (2,), carries_batch=True),
               search.TensorEdge("c", 10, 2, (), True)]
    ones = np.ones((3, 3))
    problem = search.Problem(ones, tensors, np.zeros(2), np.zeros(2), np.zeros(2, bool),
                             np.zeros(3, int), np.full(3, 2), batched_ms=ones / 4,
                             batchable=np.array([True, True, True]), max_batch=4)
    assert list(search.tier_batches(problem, [0, 1, 2])) == [4, 4, 4]
    problem.tensors[1] = dataclasses.replace(tensors[1], carries_batch=False)
    assert list(search.tier_batches(problem, [0, 0, 2])) == [4, 1, 4]    # a stays inside
    assert list(search.tier_batches(problem, [0, 1, 2])) == [1, 1, 4]    # a leaves 0, enters 1
    problem.batchable[1] = False
    assert list(search.tier_batches(problem, [0, 0, 2])) == [1, 1, 4]
    evaluation = search.evaluate(problem, [0, 0, 2])
    assert list(evaluation.stage_compute_ms) == [2.0, 0.0, 0.25]
    assert list(evaluation.compute_ms) == [2.0, 0.0, 1.0]     # a lone request's compute
    assert evaluation.bottleneck_ms == 2.0
    problem.batched_ms[2, 2] = 1.0                           # no faster in a batch: alone
    assert list(search.tier_batches(problem, [0, 0, 2])) == [1, 1, 1]


def test_batching_never_predicts_less_throughput():
    """A tier batches only where that is faster per request: the batched optimum is never
    below the unbatched one (over the cuts the DP searches)."""
    rng = np.random.default_rng(8)
    for _ in range(40):
        problem = with_batching(random_problem(rng, int(rng.integers(2, 8)), 3), rng)
        alone = dataclasses.replace(problem, max_batch=1)
        batched = search.evaluate(problem, search.solve(problem, "throughput"))
        unbatched = search.evaluate(alone, search.solve(alone, "throughput"))
        assert batched.bottleneck_ms <= unbatched.bottleneck_ms + 1e-9


def test_without_batching_nothing_changes():
    rng = np.random.default_rng(2)
    problem = random_problem(rng, 6, 3)
    batched = with_batching(problem, rng, max_batch=1)      # a batch of one is no batching
    for tiers in topological_cuts(problem):
        plain, same = search.evaluate(problem, tiers), search.evaluate(batched, tiers)
        assert plain.bottleneck_ms == same.bottleneck_ms
        assert list(same.tier_batch) == [1, 1, 1]
