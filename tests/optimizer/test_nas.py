"""wpk-nas: the mbconv space, the NASWOT proxy, the search's Pareto set, the command."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("deap")

from wpk.errors import WpkError  # noqa: E402
from wpk.optimizer.nas_cli import main  # noqa: E402
from wpk.optimizer.nas_proxy import naswot_score  # noqa: E402
from wpk.optimizer.nas_search import Evaluator, pareto, search  # noqa: E402
from wpk.optimizer.nas_space import (Architecture, build, gene_ranges, mobilenet_v2,  # noqa: E402
                                     parameters)
from wpk.partitioner.costs import Efficiency  # noqa: E402
from wpk.partitioner.measured import costs_from_table  # noqa: E402
from wpk.partitioner.request import PartitionRequest  # noqa: E402

from tests.profile.op_tables import power_law_table, write_table  # noqa: E402


def test_space_round_trip_and_mobilenet_v2():
    reference = mobilenet_v2(1.0)
    assert Architecture.from_genes(reference.genes()) == reference
    assert len(reference.genes()) == len(gene_ranges())
    assert 3.3e6 < parameters(reference) < 3.7e6        # MobileNetV2 has 3.5 M weights
    assert reference.describe().startswith("w1 d1-2-3-4-3-3-1 k3e1 k3e6")
    model = build(mobilenet_v2(0.5), image_size=64)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": np.zeros((1, 3, 64, 64), np.float32)})[0]
    assert out.shape == (1, 1000)


def test_proxy_is_deterministic_and_tells_inputs_apart():
    arch = mobilenet_v2(0.5)
    first = naswot_score(arch, image_size=32, batch=8, seed=1)
    assert np.isfinite(first) and first == naswot_score(arch, image_size=32, batch=8, seed=1)
    same = np.repeat(np.random.default_rng(0).standard_normal((1, 3, 32, 32)), 8,
                     axis=0).astype(np.float32)
    assert naswot_score(arch, inputs=same) == float("-inf")     # identical codes: singular


@pytest.fixture
def table(tmp_path):
    return write_table(tmp_path / "t.json", power_law_table("box", gflops=20, gbytes=5))


def _evaluator(table):
    def request_for(graph):
        return PartitionRequest(model=graph, tiers=["device"], efficiency=Efficiency(),
                                measured={"device": [costs_from_table(graph, "device", table,
                                                                      warn=lambda m: None)]},
                                verify=False)
    return Evaluator(request_for, image_size=64, proxy_size=32, proxy_batch=8)


def test_search_returns_a_non_dominated_set_within_the_bound(table):
    evaluate = _evaluator(table)
    bound = evaluate(mobilenet_v2(0.75)).latency_ms
    front = search(evaluate, bound, population=6, generations=2, seed=3)
    assert front and all(p.latency_ms <= bound for p in front)
    assert not any(a.dominates(b) for a in front for b in front)
    ranges = gene_ranges()
    for evaluated in evaluate.seen.values():
        assert all(lo <= g <= hi for g, (lo, hi) in zip(evaluated.arch.genes(), ranges))
    assert pareto(list(evaluate.seen.values()), bound) == front
    again = search(_evaluator(table), bound, population=6, generations=2, seed=3)
    assert [p.arch for p in again] == [p.arch for p in front]
    with pytest.raises(WpkError, match="--population must be at least 4"):
        search(evaluate, bound, population=2)


def test_cli_writes_the_pareto_set_and_its_plans(table, tmp_path, capsys):
    out = tmp_path / "nas"
    assert main(["--tiers", "device", "--latency-table", f"device={table}",
                 "--max-latency-ms", "1000", "-o", str(out), "--population", "4",
                 "--generations", "1", "--image-size", "64", "--proxy-size", "32",
                 "--proxy-batch", "8", "--measure", "device", "--threads", "1",
                 "--no-calibrate"]) == 0
    document = json.loads((out / "pareto.json").read_text())
    members = document["members"]
    assert members and sum(m["reference"] for m in members) == 1
    for member in members:
        assert (out / member["model"]).is_file() and (out / member["plan"] / "plan.json").is_file()
        assert member["predicted_latency_ms"] <= 1000 or member["reference"]
        assert member["measured_latency_ms"] > 0
    assert "Pareto set" in capsys.readouterr().out
    assert main(["--tiers", "device", "--latency-table", f"device={table}", "-o", str(out),
                 "--population", "4", "--generations", "1", "--image-size", "64"]) == 2
    assert "exists (an earlier result)" in capsys.readouterr().err
    assert main(["--tiers", "device", "--latency-table", f"device={table}",
                 "--max-latency-ms", "1e-6", "-o", str(tmp_path / "none"), "--population", "4",
                 "--generations", "1", "--image-size", "64", "--proxy-size", "32",
                 "--no-calibrate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no architecture found meets --max-latency-ms 1e-06: the fastest evaluated" in err
    assert len([line for line in err.splitlines() if line.startswith("wpk: ")]) == 1
