"""Choosing the model with the cuts and machines (`--candidate`): exact against brute force
over candidates x cuts x machines on small models; the trade-off table; impossible goals."""
from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest

from wpk.errors import WpkError
from wpk.examples import random_dag
from wpk.graph import Graph
from wpk.op_predict import Predictor
from wpk.op_table import OpTable
from wpk.partitioner import search
from wpk.partitioner.api import build_problem
from wpk.partitioner.candidates import Candidate, choose, parse_candidate, plan_candidates
from wpk.partitioner.cli import main
from wpk.partitioner.costs import Efficiency, estimated_costs, measured_costs
from wpk.partitioner.request import PartitionRequest
from wpk.tiers import load_tiers

from tests.profile.op_tables import power_law_table

LINKS = ("device-edge=100mbit,0.2ms", "edge-cloud=50mbit,2ms")
# (GFLOP/s, GB/s): slow machines for small models; box-a is the faster for matrix products,
# box-b for memory-bound operators, so that the edge machine depends on the model
TABLES = {"pi": (0.001, 0.0005), "box-a": (0.05, 0.002), "box-b": (0.01, 0.05)}


@pytest.fixture(scope="module")
def tables():
    return {name: OpTable.from_document(power_law_table(name, gflops=f, gbytes=b))
            for name, (f, b) in TABLES.items()}


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    """Five small DAGs (5 to 7 nodes, widths 4 to 1024) as model files, with made-up
    accuracies."""
    directory = tmp_path_factory.mktemp("candidates")
    found = []
    for seed, accuracy in zip(range(5), (71.0, 74.5, 76.0, 74.5, 80.0)):
        path = directory / f"net{seed}.onnx"
        onnx.save(random_dag(5 + seed % 3, width=4 * 4 ** seed, seed=seed), str(path))
        found.append((Candidate(path, accuracy), Graph.load(path)))
    return found


def _columns(graph, tables, tiers):
    """Per tier the candidate machines' columns: device pi; edge box-a or box-b; cloud the
    preset's roofline."""
    def column(tier, name):
        return measured_costs(tier, Predictor(tables[name]).predict(graph).node_ms,
                              f"predicted ({name})", machine=name)
    return [[column("device", "pi")], [column("edge", "box-a"), column("edge", "box-b")],
            [estimated_costs(graph, tiers[2], Efficiency())]]


def _brute_force_latency(graph, tables) -> float:
    """The fastest plan by enumerating every machine choice and every assignment."""
    tiers = load_tiers(["device", "edge", "cloud"], None, list(LINKS), [])
    best = np.inf
    for machines in itertools.product(*_columns(graph, tables, tiers)):
        problem = build_problem(graph, tiers, machines)
        best = min(best, search.brute_force(problem).latency_ms)
    return best


def _planned(candidates, tables):
    def request(graph):
        measured = {"device": _columns(graph, tables, load_tiers(
            ["device", "edge", "cloud"], None, list(LINKS), []))[0],
            "edge": _columns(graph, tables, load_tiers(
                ["device", "edge", "cloud"], None, list(LINKS), []))[1]}
        return PartitionRequest(model=graph, tiers=["device", "edge", "cloud"],
                                links=LINKS, measured=measured, efficiency=Efficiency(),
                                verify=False)
    return plan_candidates([c for c, _ in candidates], [g for _, g in candidates], request)


def _expected(latencies, accuracies, objective, bound, floor):
    ok = [i for i in range(len(latencies))
          if (bound is None or latencies[i] <= bound + 1e-9)
          and (floor is None or accuracies[i] >= floor)]
    if not ok:
        return None
    if objective == "accuracy":
        return min(ok, key=lambda i: (-accuracies[i], latencies[i]))
    return min(ok, key=lambda i: (latencies[i], -accuracies[i]))


def test_choice_is_exact_against_brute_force(candidates, tables):
    brute = [_brute_force_latency(graph, tables) for _, graph in candidates]
    accuracies = [c.accuracy for c, _ in candidates]
    planned = _planned(candidates, tables)
    assert [p.latency_ms for p in planned] == pytest.approx(brute, rel=1e-9)
    bounds = sorted(brute)
    goals = [("accuracy", b, None) for b in [None, bounds[0] * 0.99] + bounds] + \
            [("latency", None, f) for f in (None, 72.0, 74.5, 76.0, 80.0, 81.0)] + \
            [("latency", bounds[2], 74.5), ("accuracy", bounds[3], 75.0)]
    for objective, bound, floor in goals:
        expected = _expected(brute, accuracies, objective, bound, floor)
        for item in planned:
            item.meets, item.note = True, ""
        if expected is None:
            with pytest.raises(WpkError):
                choose(planned, objective, bound, floor)
            continue
        chosen = choose(planned, objective, bound, floor).chosen
        assert planned.index(chosen) == expected, (objective, bound, floor)


def test_impossible_goals_name_the_best_value(candidates, tables):
    planned = _planned(candidates, tables)
    fastest = min(planned, key=lambda p: p.latency_ms)
    with pytest.raises(WpkError) as caught:
        choose(planned, "accuracy", fastest.latency_ms / 2, None)
    assert str(caught.value) == (
        f"no candidate meets --max-latency-ms {fastest.latency_ms / 2:g}: the fastest is "
        f"{fastest.candidate.label} at {fastest.latency_ms:.2f} ms")
    with pytest.raises(WpkError, match="no candidate reaches --min-acc 90: the most accurate "
                                       "is net4.onnx at 80"):
        choose(planned, "latency", None, 90)


def test_candidate_specs():
    assert parse_candidate("dir:x/m.onnx:acc=75.2") == Candidate(
        __import__("pathlib").Path("dir:x/m.onnx"), 75.2)
    for bad, message in (("m.onnx", "expected MODEL.onnx:acc=NUMBER"),
                         ("m.onnx:acc=high", "is not a number"),
                         ("m.onnx:acc=nan", "finite")):
        with pytest.raises(WpkError, match=message):
            parse_candidate(bad)


def _cli(candidates, tables_dir, *extra):
    specs = [arg for c, _ in candidates for arg in ("--candidate", f"{c.path}:acc={c.accuracy}")]
    return main([*specs, "--tiers", "device,edge,cloud", "--link", LINKS[0], "--link", LINKS[1],
                 "--latency-table", f"device={tables_dir / 'pi.json'}",
                 "--latency-table", f"edge={tables_dir / 'box-a.json'}",
                 "--latency-table", f"edge={tables_dir / 'box-b.json'}", "--no-calibrate",
                 *extra])


@pytest.fixture
def tables_dir(tmp_path):
    for name, (f, b) in TABLES.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(power_law_table(name, gflops=f,
                                                                          gbytes=b)))
    return tmp_path


def test_cli_prints_the_tradeoff_and_writes_the_chosen_plan(candidates, tables, tables_dir,
                                                            capsys):
    planned = _planned(candidates, tables)
    bound = sorted(p.latency_ms for p in planned)[2]
    out = tables_dir / "plan"
    assert _cli(candidates, tables_dir, "--max-latency-ms", f"{bound + 1e-6}", "-o",
                str(out)) == 0
    text = capsys.readouterr().out
    assert "candidates (most accurate within the latency bound)" in text
    rows = {line.split()[0]: line for line in text.splitlines() if ".onnx " in line}
    assert len(rows) == 5 and sum("chosen" in row for row in rows.values()) == 1
    chosen = choose(planned, "accuracy", bound + 1e-6, None).chosen
    assert "chosen" in rows[chosen.candidate.label]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"]["name"] == chosen.candidate.path.stem
    assert plan["objective"]["max_latency_ms"] == pytest.approx(bound + 1e-6)
    assert plan["predicted"]["latency_ms"] == pytest.approx(chosen.latency_ms)


def test_cli_refusals_are_one_line(candidates, tables_dir, capsys, mlp_path):
    fast = str(candidates[0][0].path)
    cases = [
        (["--max-latency-ms", "1e-6"], "no candidate meets --max-latency-ms 1e-06: the fastest"),
        (["--objective", "latency", "--min-acc", "99"], "no candidate reaches --min-acc 99"),
        (["--objective", "throughput"], "--candidate chooses by accuracy or latency"),
        (["--pin", "x=device"], "--pin names one model's nodes"),
        (["--profile", "device=p.json"], "--profile names one model's nodes"),
        ([fast], "give the model either as the argument"),
        (["--candidate", f"{fast}:acc=1"], "is given twice"),
    ]
    for extra, message in cases:
        assert _cli(candidates, tables_dir, *extra, "-o", str(tables_dir / "x")) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (extra, err)
    assert main([str(mlp_path), "--min-acc", "70"]) == 2
    assert "--min-acc chooses among --candidate models" in capsys.readouterr().err


def test_the_small_models_have_interesting_plans(candidates, tables):
    """The brute-force check means something only if plans differ: cuts across tiers and
    both edge machines appear among the candidates' optima."""
    planned = _planned(candidates, tables)
    used = {tuple(int((p.result.best.evaluation.tiers == i).sum()) > 0 for i in range(3))
            for p in planned}
    machines = {p.result.best.machines[1].machine for p in planned}
    assert len(used) == 3 and machines == {"box-a", "box-b"}
