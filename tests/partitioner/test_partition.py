"""End to end: models -> verified slices + plan.json, for every objective and tier count."""
import json

import numpy as np
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
    """Called from Python, the message names the parameter; wpk-partition names its flag."""
    with pytest.raises(WpkError, match="needs a latency bound: max_latency_ms$"):
        partition(resnet_path, ["device", "edge"], objective="bandwidth", use_calibration=False)


def test_deliver_to_cloud_counts_the_trip_there(mlp_path, tmp_path):
    to_device = partition(mlp_path, ["device", "edge", "cloud"], use_calibration=False,
                          links=["device-edge=10kbit,1ms"])
    to_cloud = partition(mlp_path, ["device", "edge", "cloud"], use_calibration=False,
                         links=["device-edge=10kbit,1ms"], deliver_to="cloud", out_dir=tmp_path)
    assert to_cloud.plan.objective.deliver_to == "cloud"
    assert to_cloud.plan.tiers[-1].name == "cloud"
    assert to_cloud.plan.tiers[-1].results == [o.name for o in to_cloud.plan.model.outputs]
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


def _tiny_model(nodes, inputs, outputs, initializers=()):
    from onnx import TensorProto, helper

    def value(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph(nodes, "tiny", [value(n, s) for n, s in inputs],
                              [value(n, s) for n, s in outputs], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_output_that_is_an_initializer_is_a_clear_error():
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    model = _tiny_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 2])],
                        [("y", None), ("w", [2, 2])], [weight])
    with pytest.raises(WpkError, match="output 'w' is computed by no node"):
        Graph.load(model)


def test_quantized_conv_is_planned(tmp_path):
    from onnx import helper, numpy_helper

    def scalar(name, value, dtype):
        return numpy_helper.from_array(np.array(value, dtype), name)

    weights = [scalar("xs", 0.1, np.float32), scalar("xz", 0, np.uint8),
               numpy_helper.from_array(np.ones((8, 3, 3, 3), np.uint8), "w"),
               scalar("ws", 0.1, np.float32), scalar("wz", 0, np.uint8),
               scalar("ys", 0.1, np.float32), scalar("yz", 0, np.uint8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
             helper.make_node("QLinearConv", ["q", "xs", "xz", "w", "ws", "wz", "ys", "yz"],
                              ["qy"], pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["qy", "ys", "yz"], ["y"])]
    graph = Graph.load(_tiny_model(nodes, [("x", [1, 3, 8, 8])], [("y", None)], weights))
    assert graph.nodes[1].flops == 2 * 8 * 8 * 8 * 3 * 3 * 3
    result = partition(graph, ["device", "edge"], use_calibration=False, out_dir=tmp_path)
    assert result.plan.verification["passed"]


def test_raw_input_that_is_an_output_cannot_be_delivered_beyond_the_device():
    from onnx import helper

    model = _tiny_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 4])],
                        [("y", None), ("x", [1, 4])])
    with pytest.raises(WpkError, match="output 'x' is the raw input"):
        partition(Graph.load(model), ["device", "edge", "cloud"], deliver_to="cloud",
                  use_calibration=False)
    plan = partition(Graph.load(model), ["device", "edge", "cloud"], deliver_to="cloud",
                     privacy="none", use_calibration=False).plan
    assert "x" in plan.links[0].tensors


def test_impossible_latency_bound_with_the_throughput_objective(mlp_path):
    with pytest.raises(WpkError, match="impossible constraint"):
        partition(mlp_path, ["device", "edge"], objective="throughput", max_latency_ms=1e-4,
                  use_calibration=False)


@pytest.mark.parametrize("deliver_to", ["device", "edge", "cloud"])
@pytest.mark.parametrize("privacy", ["raw-input-on-device", "none"])
@pytest.mark.parametrize("links", [["device-edge=1gbit,1ms", "edge-cloud=1gbit,1ms"],
                                   ["device-edge=1mbit,1ms", "edge-cloud=1gbit,1ms"]])
def test_plan_links_add_up_to_the_prediction(mlp_path, tmp_path, deliver_to, privacy, links):
    """Every hop the prediction pays for is a link of the plan, so the links' transfer times
    add up to the predicted transfer time; the plan starts where the input is (the device)."""
    result = partition(mlp_path, ["device", "edge", "cloud"], links=links, privacy=privacy,
                       deliver_to=deliver_to, use_calibration=False, out_dir=tmp_path)
    plan = result.plan
    assert plan.tiers[0].name == "device"
    assert plan.tiers[0].inputs == [o.name for o in plan.model.inputs]
    assert sum(link.predicted_transfer_ms for link in plan.links) == pytest.approx(
        plan.predicted["transfer_ms"], abs=1e-5)
    assert sum(t.predicted_compute_ms for t in plan.tiers) == pytest.approx(
        plan.predicted["compute_ms"], abs=1e-5)
    answered = [name for tier in plan.tiers for name in tier.results]
    assert sorted(answered) == sorted(o.name for o in plan.model.outputs)
    for a, b in zip(plan.tiers, plan.tiers[1:]):
        assert a.forward == b.inputs
    feeds = random_inputs(result.graph, seed=5)
    _, got = run_plan_directory(tmp_path, feeds)
    for name, value in whole_model(mlp_path, feeds).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-3, atol=1e-4)


def _custom_op_model(output_shape):
    from onnx import helper

    model = _tiny_model([helper.make_node("Relu", ["x"], ["a"]),
                         helper.make_node("Foo", ["a"], ["y"], domain="custom")],
                        [("x", [1, 4])], [("y", output_shape)])
    model.opset_import.append(helper.make_opsetid("custom", 1))
    return model


def test_tensor_without_inferred_shape_is_not_taken_for_a_scalar():
    with pytest.raises(WpkError, match="'y' without a static shape.*could not run the model"):
        Graph.load(_custom_op_model(None))


def test_model_onnx_runtime_cannot_run_is_a_one_line_error(tmp_path):
    graph = Graph.load(_custom_op_model([1, 4]))
    with pytest.raises(WpkError, match="ONNX Runtime cannot run") as error:
        partition(graph, ["device", "edge"], use_calibration=False, out_dir=tmp_path)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "plan.json").exists()


def test_top_and_pareto_only_show_more_they_never_change_the_plan():
    """--top and --pareto evaluate more cuts; the throughput search's DP is exact only over
    cuts along one topological order, so those cuts can have a smaller bottleneck: they are
    listed, but the plan stays what the search chose."""
    from wpk.examples import random_dag

    for seed in (1, 5):
        graph = Graph.load(random_dag(40, seed=seed))
        common = dict(objective="throughput", use_calibration=False,
                      links=["device-edge=50mbit,2ms"])
        plain = partition(graph, ["device", "edge", "cloud"], **common)
        shown = partition(graph, ["device", "edge", "cloud"], top=3, with_front=True, **common)
        assert (plain.best.evaluation.tiers == shown.best.evaluation.tiers).all()
        assert plain.plan.predicted == shown.plan.predicted
        assert len(shown.top) == 3 and shown.front


def test_link_codec_is_declared_and_priced(resnet_path, tmp_path):
    graph = Graph.load(resnet_path)
    first_conv_relu = graph.nodes[3].name   # keep the cut fixed: device runs the stem only
    common = dict(links=["device-edge=10mbit,1ms"], use_calibration=False,
                  pins={first_conv_relu: "device", graph.nodes[4].name: "edge"})
    raw = partition(graph, ["device", "edge"], **common)
    fp16 = partition(graph, ["device", "edge"], codecs=["device-edge=fp16+zstd"],
                     out_dir=tmp_path, **common)
    link_raw, link_fp16 = raw.plan.links[0], fp16.plan.links[0]
    assert link_fp16.codec == "fp16+zstd" and link_raw.codec == "raw"
    assert link_fp16.tensors == link_raw.tensors
    # half the bytes on the wire: half the serialization time, same RTT
    serial_raw = link_raw.predicted_transfer_ms - 1.0
    serial_fp16 = link_fp16.predicted_transfer_ms - 1.0
    assert serial_fp16 == pytest.approx(serial_raw / 2, rel=1e-6)
    assert json.loads((tmp_path / "plan.json").read_text())["links"][0]["codec"] == "fp16+zstd"


@pytest.mark.parametrize("spec, message", [("device-edge=bf16", "unknown codec"),
                                           ("edge-cloud=fp16", "joins no two consecutive"),
                                           ("device=fp16", "expected SRC-DST=CODEC")])
def test_bad_codec(mlp_path, spec, message):
    with pytest.raises(WpkError, match=message):
        partition(mlp_path, ["device", "edge"], codecs=[spec], use_calibration=False)


def test_tier_between_links_of_different_codecs_relays(resnet_path, tmp_path):
    """The prediction prices each physical link with its own codec; a plan link through an
    unused tier would carry one encoding over both hops. So a tier where the codec changes
    stays in the plan (no slice) and re-encodes: each plan link is priced as it is sent."""
    tiers_file = tmp_path / "tiers.yaml"
    tiers_file.write_text("tiers:\n  - {name: device}\n  - {name: edge, preset: mcu}\n"
                          "  - {name: cloud}\n")         # an edge too slow to run anything
    links = ["device-edge=10gbit,0.1ms", "edge-cloud=10gbit,0.1ms"]
    result = partition(resnet_path, tiers_file=tiers_file, links=links,
                       codecs=["edge-cloud=fp16"], use_calibration=False, out_dir=tmp_path)
    plan = result.plan
    assert not (result.best.evaluation.tiers == 1).any()       # nothing runs on the edge
    assert [t.name for t in plan.tiers] == ["device", "edge", "cloud"]
    edge = plan.tier("edge")
    assert edge.slice is None and edge.inputs == edge.forward == edge.passthrough
    assert [(link.codec, link.via) for link in plan.links] == [("raw", []), ("fp16", [])]
    assert sum(link.predicted_transfer_ms for link in plan.links) == pytest.approx(
        plan.predicted["transfer_ms"], abs=1e-5)
    same = partition(resnet_path, tiers_file=tiers_file, links=links, use_calibration=False)
    assert [link.via for link in same.plan.links] == [["edge"]]   # same codec: no relay
