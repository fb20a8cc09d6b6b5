"""wpk-partition --max-leakage: the bound holds on the plan, is exact, and says its limit."""
import json

import numpy as np
import pytest

from wpk.errors import WpkError
from wpk.examples import resnet_like
from wpk.graph import Graph
from wpk.partitioner import leakage
from wpk.partitioner.api import partition
from wpk.partitioner.cli import main
from wpk.plan import load_plan

LINK = ["device-edge=10mbit,5ms"]


@pytest.fixture(scope="module")
def graph_and_report():
    graph = Graph.load(resnet_like(image_size=16, width=4, classes=5), name="small")
    samples = {"image": np.random.default_rng(0).random((40, 1, 3, 16, 16)).astype(np.float32)}
    return graph, leakage.measure(graph, samples, "test samples", reps=20)


def plan_with(graph, report, bound=None, **extra):
    return partition(graph, ["device", "edge"], links=LINK, use_calibration=False,
                     pins={"gemm_77": "edge"}, max_leakage=bound, leakage=report, verify=False,
                     **extra).plan


def crossing(plan) -> list[str]:
    return [t for link in plan.links if link.src == "device" for t in link.tensors]


def test_every_tensor_leaving_the_device_meets_the_bound(graph_and_report):
    graph, report = graph_and_report
    free = plan_with(graph, report)
    assert free.objective.leakage_data == "test samples" and free.objective.max_leakage is None
    values = sorted({t.dcor for t in report.tensors.values()})
    planned = 0
    for bound in values[::3]:
        try:
            plan = plan_with(graph, report, f"dcor={bound}")
        except WpkError as error:
            assert "the tightest possible is dcor=" in str(error)
            continue
        planned += 1
        assert plan.objective.max_leakage == f"dcor={bound}"
        assert all(report.tensors[t].dcor <= bound for t in crossing(plan))
        assert set(plan.links[0].leakage) == set(crossing(plan))
        assert plan.predicted["latency_ms"] >= free.predicted["latency_ms"] - 1e-9
    assert planned >= 3


def test_an_impossible_bound_names_the_tightest_possible(graph_and_report):
    graph, report = graph_and_report
    with pytest.raises(WpkError, match=r"the tightest possible is psnr=") as error:
        plan_with(graph, report, "psnr=0")
    assert "\n" not in str(error.value)
    tightest = str(error.value).rsplit("=", 1)[1]
    plan = plan_with(graph, report, f"psnr={tightest}")
    assert all(report.tensors[t].psnr_db <= float(tightest) for t in crossing(plan))


def test_cli_writes_the_figures_into_a_plan_that_loads(tmp_path, capsys):
    import onnx

    model = tmp_path / "small.onnx"
    onnx.save(resnet_like(image_size=16, width=4, classes=5), model)
    samples = tmp_path / "samples.npz"
    np.savez(samples, image=np.random.default_rng(1).random((20, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "plan"
    args = [str(model), "--tiers", "device,edge", "--link", LINK[0], "--no-calibrate",
            "--pin", "gemm_77=edge", "--calibration-data", str(samples), "-o", str(out)]
    assert main(args + ["--max-leakage", "dcor=0.6"]) == 0
    assert "leaving the device (" in capsys.readouterr().out
    plan = load_plan(out)
    assert plan.objective.max_leakage == "dcor=0.6" and plan.links[0].leakage
    data = json.loads((out / "plan.json").read_text())
    assert all(f["dcor"] <= 0.6 for f in data["links"][0]["leakage"].values())
    assert main(args + ["--force", "--max-leakage", "psnr=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-leakage psnr=0; the tightest possible is psnr=" in err
    assert main(args + ["--force", "--max-leakage", "size=3"]) == 2
    assert "bad --max-leakage 'size=3'" in capsys.readouterr().err


def test_the_leakage_front_is_exact_point_by_point(graph_and_report):
    graph, report = graph_and_report
    result = partition(graph, ["device", "edge"], links=LINK, use_calibration=False,
                       pins={"gemm_77": "edge"}, leakage=report, verify=False, with_front=True)
    front = result.leakage_front
    assert len(front) >= 3 and result.leakage_metric == "dcor"
    assert front[0][0] == pytest.approx(result.plan.predicted["latency_ms"])
    for (latency, worst, _), (next_latency, next_worst, _) in zip(front, front[1:]):
        assert next_worst < worst and next_latency >= latency - 1e-9
    for latency, worst, _ in front[1:]:     # each point: the fastest plan within its leakage
        plan = plan_with(graph, report, f"dcor={worst}")
        assert plan.predicted["latency_ms"] == pytest.approx(latency, abs=1e-6)
    with pytest.raises(WpkError, match="tightest possible"):
        plan_with(graph, report, f"dcor={front[-1][1] - 1e-9}")
