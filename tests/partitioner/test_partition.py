"""End to end: models -> verified slices + plan.json, for every objective and tier count."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from wpk.errors import WpkError
from wpk.graph import Graph
from wpk.partitioner.api import partition
from wpk.partitioner.slicing import random_inputs
from wpk.plan import load_plan, slice_path

FAST_DEVICE = "--no-calibrate"


def run_plan_directory(directory, feeds):
    """Chain the written slices as the runtime would, from plan.json alone."""
    plan = load_plan(directory)
    arriving, results = dict(feeds), {}
    for tier in plan.tiers:
        values = {name: arriving[name] for name in tier.inputs}
        if tier.slice:
            session = ort.InferenceSession(str(slice_path(directory, tier)),
                                           providers=["CPUExecutionProvider"])
            assert [i.name for i in session.get_inputs()] == tier.slice_inputs
            outs = session.run(tier.slice_outputs, {n: values[n] for n in tier.slice_inputs})
            values.update(zip(tier.slice_outputs, outs))
        results.update({n: values[n] for n in tier.results})
        arriving = {n: values[n] for n in tier.forward}
    return plan, results


def whole_model(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.parametrize("model", ["resnet_like", "mobilenet_like", "mlp"])
@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_three_tier_plans_match_the_whole_model(models_dir, tmp_path, model, objective):
    path = models_dir / f"{model}.onnx"
    result = partition(path, ["device", "edge", "cloud"], objective=objective,
                       use_calibration=False, out_dir=tmp_path)
    feeds = random_inputs(result.graph, seed=42)
    plan, got = run_plan_directory(tmp_path, feeds)
    expected = whole_model(path, feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-3, atol=1e-4)
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["version"] == 1 and data["model"]["name"] == model
    assert data["objective"]["name"] == objective
    assert data["verification"]["passed"] is True
    for tier in data["tiers"]:
        assert {"name", "slice", "inputs", "outputs", "predicted_compute_ms"} <= set(tier)
    names = [t["name"] for t in data["tiers"]]
    assert names == sorted(names, key=["device", "edge", "cloud"].index)
    assert data["predicted"]["latency_ms"] > 0


def test_forced_three_way_split_forwards_skip_tensors(resnet_path, tmp_path):
    """Pins force a cut inside a residual block: the skip tensor crosses, and a tensor that
    skips the edge tier is forwarded by it (listed in its inputs and outputs)."""
    graph = Graph.load(resnet_path)
    adds = [n for n in graph.nodes if n.op_type == "Add"]
    block_add = adds[0]          # first residual Add: its shortcut comes from before the block
    first_conv, second_conv = graph.nodes[block_add.index - 3], graph.nodes[block_add.index - 1]
    assert first_conv.op_type == second_conv.op_type == "Conv"
    result = partition(graph, ["device", "edge", "cloud"], use_calibration=False,
                       pins={first_conv.name: "device", second_conv.name: "edge",
                             block_add.name: "cloud"}, out_dir=tmp_path)
    plan = result.plan
    assert [t.name for t in plan.tiers] == ["device", "edge", "cloud"]
    edge = plan.tier("edge")
    assert edge.passthrough, "the shortcut tensor should pass through the edge tier"
    for name in edge.passthrough:
        assert name in edge.inputs and name in edge.outputs and name not in edge.slice_inputs
    feeds = random_inputs(result.graph, seed=1)
    _, got = run_plan_directory(tmp_path, feeds)
    for name, value in whole_model(resnet_path, feeds).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-3, atol=1e-4)


def test_concat_branches_cut_in_the_middle(resnet_path, tmp_path):
    """A cut through the parallel branches of the Concat block."""
    graph = Graph.load(resnet_path)
    concat = next(n for n in graph.nodes if n.op_type == "Concat")
    result = partition(graph, ["device", "edge"], use_calibration=False,
                       pins={concat.name: "edge", graph.nodes[concat.index - 1].name: "device"},
                       out_dir=tmp_path)
    crossing = result.plan.links[0].tensors
    assert len(crossing) >= 2   # several branch outputs cross the one link
    feeds = random_inputs(result.graph, seed=3)
    _, got = run_plan_directory(tmp_path, feeds)
    for name, value in whole_model(resnet_path, feeds).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-3, atol=1e-4)


def test_privacy_keeps_raw_input_on_device(resnet_path):
    # A very slow device and a fast link make shipping the raw input attractive.
    links = ["device-edge=10gbit,0.1ms"]
    private = partition(resnet_path, ["device", "edge"], links=links, use_calibration=False)
    graph = private.graph
    first_readers = graph.consumers[graph.inputs[0]]
    assert all(private.best.evaluation.tiers[v] == 0 for v in first_readers)
    assert graph.inputs[0] not in private.plan.links[0].tensors
    open_plan = partition(resnet_path, ["device", "edge"], links=links, privacy="none",
                          use_calibration=False)
    assert graph.inputs[0] in open_plan.plan.links[0].tensors or \
        open_plan.plan.tiers[0].name == "edge"
    assert open_plan.plan.predicted["latency_ms"] <= private.plan.predicted["latency_ms"]


def test_one_best_tier_gives_one_slice(mlp_path, tmp_path):
    # A starved link: everything stays on the device.
    result = partition(mlp_path, ["device", "edge", "cloud"], links=["device-edge=10kbit,500ms"],
                       use_calibration=False, out_dir=tmp_path)
    assert [t.name for t in result.plan.tiers] == ["device"]
    assert not result.plan.links
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device.onnx", "plan.json"]


def test_bandwidth_objective_sends_fewer_bytes_beyond_edge(resnet_path):
    tiers = ["device", "edge", "cloud"]
    fastest = partition(resnet_path, tiers, use_calibration=False, links=[
        "edge-cloud=1gbit,1ms"])
    slo = fastest.plan.predicted["latency_ms"] * 3
    frugal = partition(resnet_path, tiers, objective="bandwidth", max_latency_ms=slo,
                       use_calibration=False, links=["edge-cloud=1gbit,1ms"])
    assert frugal.plan.predicted["latency_ms"] <= slo
    assert frugal.plan.predicted["bytes_beyond_edge"] <= fastest.plan.predicted["bytes_beyond_edge"]


def test_bandwidth_objective_needs_an_slo(resnet_path):
    with pytest.raises(WpkError, match="--max-latency-ms"):
        partition(resnet_path, ["device", "edge"], objective="bandwidth", use_calibration=False)


def test_deliver_to_cloud_counts_the_trip_there(mlp_path, tmp_path):
    to_device = partition(mlp_path, ["device", "edge", "cloud"], use_calibration=False,
                          links=["device-edge=10kbit,1ms"])
    to_cloud = partition(mlp_path, ["device", "edge", "cloud"], use_calibration=False,
                         links=["device-edge=10kbit,1ms"], deliver_to="cloud", out_dir=tmp_path)
    assert to_cloud.plan.objective["deliver_to"] == "cloud"
    assert to_cloud.plan.tiers[-1].name == "cloud"
    assert to_cloud.plan.tiers[-1].results == [o["name"] for o in to_cloud.plan.model["outputs"]]
    assert to_cloud.plan.predicted["latency_ms"] > to_device.plan.predicted["latency_ms"]
    assert to_cloud.plan.predicted["bytes_beyond_edge"] > 0


def test_slower_link_moves_the_cut_towards_the_device(resnet_path):
    fast = partition(resnet_path, ["device", "edge"], links=["device-edge=1gbit,1ms"],
                     use_calibration=False)
    slow = partition(resnet_path, ["device", "edge"], links=["device-edge=2mbit,1ms"],
                     use_calibration=False)
    assert (slow.best.evaluation.tiers == 0).sum() > (fast.best.evaluation.tiers == 0).sum()


def test_two_tiers_from_a_tiers_file(mlp_path, tmp_path):
    tiers_file = tmp_path / "tiers.yaml"
    tiers_file.write_text("""
tiers:
  - {name: sensor, preset: mcu}
  - {name: gateway, preset: jetson-orin, peak_gflops: 900}
links:
  - {from: sensor, to: gateway, bandwidth: 1gbit, rtt: 1ms}
""")
    result = partition(mlp_path, tiers_file=tiers_file, use_calibration=False,
                       out_dir=tmp_path / "plan")
    assert [t.name for t in result.tiers.tiers] == ["sensor", "gateway"]
    assert result.tiers[1].peak_gflops == 900
    assert "gateway" in result.plan.predicted["tiers_used"]


def test_unknown_pin_node_and_impossible_pins(resnet_path):
    graph = Graph.load(resnet_path)
    with pytest.raises(WpkError, match="no node named"):
        partition(graph, ["device", "edge"], pins={"nope": "edge"}, use_calibration=False)
    first, last = graph.nodes[0].name, graph.nodes[-1].name
    with pytest.raises(WpkError, match="raw input"):
        partition(graph, ["device", "edge"], pins={first: "edge"}, use_calibration=False)
    middle = graph.nodes[10].name
    with pytest.raises(WpkError, match="impossible pins"):
        partition(graph, ["device", "edge"], pins={middle: "edge", last: "device"},
                  use_calibration=False)
