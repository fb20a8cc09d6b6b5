"""Planning from latency tables (`--latency-table TIER=FILE`): a third cost source beside the
roofline and measured profiles."""
from __future__ import annotations

import json

import pytest

from wpk.graph import Graph
from wpk.op_predict import Predictor
from wpk.op_table import OpTable
from wpk.partitioner.cli import main

from tests.profile.op_tables import power_law_table, write_table

LINKS = ["--link", "device-edge=1gbit,0.1ms", "--link", "edge-cloud=1mbit,200ms"]


@pytest.fixture
def tables(tmp_path) -> dict:
    return {name: write_table(tmp_path / f"{name}.json",
                              power_law_table(name, gflops=gflops, gbytes=gflops / 5))
            for name, gflops in (("pi", 2.0), ("box-a", 20.0), ("box-b", 200.0))}


def plan_of(directory):
    return json.loads((directory / "plan.json").read_text())


def test_plans_with_predicted_times_and_chooses_the_faster_machine(mlp_path, tables, tmp_path,
                                                                   capsys):
    out = tmp_path / "plan"
    assert main([str(mlp_path), "--tiers", "device,edge,cloud", *LINKS, "--no-calibrate",
                 "--latency-table", f"device={tables['pi']}",
                 "--latency-table", f"edge={tables['box-a']}",
                 "--latency-table", f"edge={tables['box-b']}", "-o", str(out)]) == 0
    plan = plan_of(out)
    device, edge = plan["tiers"]
    assert device["cost_source"] == "predicted (pi, latency table)"
    assert edge["machine"] == "box-b" and edge["profile"]["kind"] == "latency-table"
    assert edge["profile"]["file"] == str(tables["box-b"])
    graph = Graph.load(mlp_path)
    predicted = Predictor(OpTable.from_document(json.loads(tables["box-b"].read_text()))
                          ).predict(graph).node_ms
    on_edge = sum(predicted[graph.node(n).index] for n in edge["nodes"])
    assert edge["predicted_compute_ms"] == pytest.approx(on_edge, rel=1e-5)
    assert "predicted (pi, latency table)" in capsys.readouterr().out


def test_a_table_and_a_profile_for_one_tier_are_candidate_machines(mlp_path, tables, tmp_path):
    from tests.partitioner.test_profile_planning import write_profile

    graph = Graph.load(mlp_path)
    profile = write_profile(tmp_path / "slow.json", graph, "slow-box", 50.0)
    out = tmp_path / "plan"
    assert main([str(mlp_path), "--tiers", "device,edge", "--link", "device-edge=1gbit,0.1ms",
                 "--no-calibrate", "--latency-table", f"device={tables['pi']}",
                 "--profile", f"edge={profile}", "--latency-table", f"edge={tables['box-b']}",
                 "-o", str(out)]) == 0
    assert plan_of(out)["tiers"][-1]["machine"] == "box-b"


def test_stand_ins_warn_and_bad_tables_are_one_line(mlp_path, tmp_path, capsys):
    thin = write_table(tmp_path / "thin.json", power_law_table(families=("binary",)))
    assert main([str(mlp_path), "--latency-table", f"device={thin}", "--no-calibrate",
                 "-o", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert f"{thin}: mlp has operators the table did not time; priced" in out
    assert "gemm as binary" in out
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    for spec, message in ((f"device={broken}", f"{broken}: not JSON"),
                          (f"device={tmp_path / 'none.json'}", "no such latency table file"),
                          (f"fog={thin}", "latency table for unknown tier 'fog'"),
                          (str(thin), "expected KEY=VALUE")):
        assert main([str(mlp_path), "--latency-table", spec, "--no-calibrate",
                     "-o", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_a_latency_bound_only_one_machine_meets_picks_it(mlp_path, tables, tmp_path, capsys):
    """With candidate machines for a tier, a bound that the slower one cannot meet is not
    impossible: the faster one is chosen (it once failed on the first machine tried)."""
    common = [str(mlp_path), "--tiers", "device,edge", "--link", "device-edge=1gbit,0.1ms",
              "--no-calibrate", "--latency-table", f"device={tables['pi']}",
              "--latency-table", f"edge={tables['box-a']}"]
    assert main(common + ["--latency-table", f"edge={tables['box-b']}",
                          "-o", str(tmp_path / "both")]) == 0
    fastest = plan_of(tmp_path / "both")["predicted"]["latency_ms"]
    bound = f"{fastest * 1.01:.6f}"
    assert main(common + ["--latency-table", f"edge={tables['box-b']}", "--max-latency-ms",
                          bound, "-o", str(tmp_path / "bound")]) == 0
    assert plan_of(tmp_path / "bound")["tiers"][-1]["machine"] == "box-b"
    assert main(common + ["--max-latency-ms", bound, "-o", str(tmp_path / "slow")]) == 2
    assert "impossible constraint: the fastest plan takes" in capsys.readouterr().err
    assert main(common + ["--latency-table", f"edge={tables['box-b']}", "--max-latency-ms",
                          f"{fastest / 2:.6f}", "-o", str(tmp_path / "none")]) == 2
    assert f"takes {fastest:.2f} ms on any choice of machines" in capsys.readouterr().err
