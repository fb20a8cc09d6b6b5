"""The search is exact: it matches brute force over every monotone assignment."""
import itertools

import numpy as np
import pytest

from wpk.errors import WpkError
from wpk.examples import random_dag
from wpk.graph import Graph
from wpk.partitioner import search
from wpk.partitioner.api import build_problem
from wpk.partitioner.costs import measured_costs
from wpk.tiers import load_tiers


def random_problem(rng, n_nodes: int, n_tiers: int, deliver_to: int = 0,
                   privacy: bool = True, chain: bool = False) -> search.Problem:
    """A random DAG (or chain): each node reads 1-2 earlier tensors or the model input."""
    readers = {i: [] for i in range(-1, n_nodes)}
    for v in range(n_nodes):
        sources = [v - 1] if chain else set(rng.integers(-1, v, size=rng.integers(1, 3)).tolist())
        for source in (sources if v else [-1]):
            readers[source].append(v)
    tensors = [search.TensorEdge(f"t{p}", int(rng.integers(1, 5000)), p, tuple(readers[p]),
                                 p >= 0 and not readers[p])
               for p in range(-1, n_nodes) if readers[p] or p >= 0]
    node_ms = rng.uniform(0.1, 10, size=(n_nodes, n_tiers)) * rng.uniform(0.05, 1, n_tiers)
    highest = np.full(n_nodes, n_tiers - 1)
    if privacy:
        highest[readers[-1]] = 0
    beyond = np.array([k == n_tiers - 2 for k in range(n_tiers - 1)])
    return search.Problem(node_ms, tensors, rng.uniform(1e-4, 5e-3, n_tiers - 1),
                          rng.uniform(0, 5, n_tiers - 1), beyond, np.zeros(n_nodes, int),
                          highest, deliver_to)


@pytest.mark.parametrize("n_tiers", [2, 3, 4])
def test_min_latency_matches_brute_force_on_random_dags(n_tiers):
    rng = np.random.default_rng(n_tiers)
    for trial in range(40 if n_tiers < 4 else 12):
        n_nodes = int(rng.integers(2, 8 if n_tiers < 4 else 6))
        problem = random_problem(rng, n_nodes, n_tiers, deliver_to=int(rng.integers(n_tiers)),
                                 privacy=bool(trial % 2))
        found = search.min_latency(problem)
        assert search.feasible(problem, found)
        best = search.brute_force(problem)
        assert search.evaluate(problem, found).latency_ms == pytest.approx(best.latency_ms,
                                                                            abs=1e-5)


def test_byte_weighted_objective_matches_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(25):
        problem = random_problem(rng, int(rng.integers(2, 7)), 3)
        weight = float(rng.uniform(0, 0.01))
        cost = lambda e: e.latency_ms + weight * e.bytes_beyond_edge  # noqa: E731
        found = search.evaluate(problem, search.min_latency(problem, weight))
        assert cost(found) == pytest.approx(cost(search.brute_force(problem, key=cost)), abs=1e-5)


def test_throughput_is_exact_on_chains():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n_tiers = int(rng.integers(2, 4))
        problem = random_problem(rng, int(rng.integers(2, 8)), n_tiers, chain=True,
                                 deliver_to=int(rng.integers(n_tiers)))
        found = search.evaluate(problem, search.max_throughput(problem))
        assert search.feasible(problem, found.tiers)
        best = search.brute_force(problem, key=lambda e: e.bottleneck_ms)
        assert found.bottleneck_ms == pytest.approx(best.bottleneck_ms, abs=1e-6)


def test_throughput_never_worse_than_latency_plan_on_dags():
    rng = np.random.default_rng(5)
    for _ in range(20):
        problem = random_problem(rng, int(rng.integers(3, 8)), 3)
        by_throughput = search.evaluate(problem, search.solve(problem, "throughput"))
        by_latency = search.evaluate(problem, search.min_latency(problem))
        assert by_throughput.bottleneck_ms <= by_latency.bottleneck_ms + 1e-9


def test_bandwidth_objective_meets_slo_with_fewest_bytes():
    rng = np.random.default_rng(11)
    for _ in range(15):
        problem = random_problem(rng, int(rng.integers(3, 7)), 3)
        fastest = search.evaluate(problem, search.min_latency(problem)).latency_ms
        slo = fastest * 1.5
        found = search.evaluate(problem, search.solve(problem, "bandwidth", slo))
        assert found.latency_ms <= slo + 1e-9
        feasible = [search.evaluate(problem, t) for t in itertools.product(
            range(3), repeat=problem.n_nodes) if search.feasible(problem, t)]
        fewest = min(e.bytes_beyond_edge for e in feasible if e.latency_ms <= slo)
        # the swept front finds the optimum whenever it is a supported point; never worse
        # than the fastest plan's bytes
        assert found.bytes_beyond_edge >= fewest
        assert found.bytes_beyond_edge <= search.evaluate(
            problem, search.min_latency(problem)).bytes_beyond_edge


def test_impossible_latency_bound_is_an_error():
    problem = random_problem(np.random.default_rng(0), 4, 3)
    with pytest.raises(WpkError, match="impossible constraint"):
        search.solve(problem, "latency", max_latency_ms=1e-6)
    with pytest.raises(WpkError, match="impossible constraint"):
        search.solve(problem, "bandwidth", max_latency_ms=1e-6)


def test_problem_built_from_a_model_matches_brute_force():
    """build_problem (tensors read by several nodes, outputs, privacy) vs. brute force."""
    graph = Graph.load(random_dag(7, width=8, seed=4))
    tiers = load_tiers(["device", "edge", "cloud"])
    rng = np.random.default_rng(1)
    for trial in range(10):
        costs = [measured_costs(t.name, rng.uniform(0.01, 2, len(graph.nodes)), "test")
                 for t in tiers.tiers]
        problem = build_problem(graph, tiers, costs, deliver_to=trial % 3)
        assert any(len(t.consumers) > 1 for t in problem.tensors)
        found = search.evaluate(problem, search.min_latency(problem))
        assert found.latency_ms == pytest.approx(search.brute_force(problem).latency_ms, abs=1e-5)


def test_pins_are_respected_and_search_stays_exact():
    graph = Graph.load(random_dag(6, width=8, seed=2))
    tiers = load_tiers(["device", "edge", "cloud"])
    costs = [measured_costs(t.name, np.full(len(graph.nodes), 1.0 / (i + 1)), "test")
             for i, t in enumerate(tiers.tiers)]
    last = graph.nodes[-1].name
    problem = build_problem(graph, tiers, costs, pins={last: "edge"})
    found = search.min_latency(problem)
    assert found[graph.node(last).index] == 1
    assert search.evaluate(problem, found).latency_ms == pytest.approx(
        search.brute_force(problem).latency_ms, abs=1e-5)


def test_min_cut_on_a_300_node_dag_gives_a_feasible_plan():
    graph = Graph.load(random_dag(300, seed=1))
    tiers = load_tiers(["device", "edge", "cloud"])
    costs = [measured_costs(t.name, np.random.default_rng(0).uniform(0, 1, len(graph.nodes)),
                            "t") for t in tiers.tiers]
    problem = build_problem(graph, tiers, costs)
    assert search.feasible(problem, search.min_latency(problem))
