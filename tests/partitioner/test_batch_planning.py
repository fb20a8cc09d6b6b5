"""Planning for throughput under dynamic batching (`--max-batch N`): which nodes can batch,
their costs at batch N (roofline or a profile taken at batch N), the plan (version 2) and the
report, and one-line refusals."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from wpk.errors import WpkError
from wpk.graph import Graph
from wpk.partitioner.api import partition
from wpk.partitioner.batch import batch_view
from wpk.partitioner.cli import main
from wpk.partitioner.costs import Efficiency, roofline_ms
from wpk.plan import load_plan
from wpk.tiers import load_tiers
from tests.partitioner.test_profile_planning import write_profile

ONE_MACHINE = "examples/one-machine.yaml"


def fixed_batch_model() -> onnx.ModelProto:
    """x[1,4,8] -> Relu -> Reshape to [1, 32] (the batch size written in) -> MatMul -> Relu:
    the Relu before the Reshape batches, the rest cannot."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="first"),
             helper.make_node("Reshape", ["a", "shape"], ["b"], name="flatten"),
             helper.make_node("MatMul", ["b", "w"], ["c"], name="matmul"),
             helper.make_node("Relu", ["c"], ["y"], name="last")]
    weights = [numpy_helper.from_array(np.array([1, 32], dtype=np.int64), "shape"),
               numpy_helper.from_array(np.ones((32, 16), np.float32), "w")]
    graph = helper.make_graph(nodes, "fixed_batch",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
                              weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_a_node_that_writes_the_batch_size_cannot_batch_nor_can_what_follows():
    view = batch_view(Graph.load(fixed_batch_model()), 8)
    assert list(view.batchable) == [True, False, False, False]
    assert view.first_unbatchable == "flatten" and view.reason is None
    assert "a" in view.carries_batch and "b" not in view.carries_batch


def test_costs_at_batch_n_scale_activations_and_read_weights_once(mlp_path):
    graph = Graph.load(mlp_path)
    view = batch_view(graph, 8)
    assert view.batchable.all() and view.reason is None
    for alone, batched in zip(graph.nodes, view.nodes):
        assert batched.flops == pytest.approx(8 * alone.flops)
        if alone.op_type == "Gemm":      # its weights once, its activations 8 times
            assert alone.bytes_touched < batched.bytes_touched < 8 * alone.bytes_touched
        else:
            assert batched.bytes_touched == 8 * alone.bytes_touched
    tier = load_tiers(["edge"])[0]
    per_request = roofline_ms(graph, tier, Efficiency(), view.nodes) / 8
    assert (per_request < roofline_ms(graph, tier, Efficiency())).all()


def test_an_input_without_a_batch_dimension_of_one_batches_nothing():
    model = fixed_batch_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    model.graph.node[1].input[1] = "shape2"
    model.graph.initializer.append(numpy_helper.from_array(np.array([2, 32], np.int64), "shape2"))
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    view = batch_view(Graph.load(model), 4)
    assert not view.batchable.any() and "no batch dimension of 1" in view.reason


def test_the_plan_records_each_tiers_batch_and_deploy_reads_it(resnet_path, tmp_path):
    result = partition(resnet_path, tiers_file=ONE_MACHINE, objective="throughput",
                       max_batch=8, use_calibration=False, out_dir=tmp_path / "plan")
    plan = load_plan(tmp_path / "plan")
    assert plan.version == 2 and plan.objective.max_batch == 8
    assert [t.batch for t in plan.tiers] == [8] * len(plan.tiers)
    batching = plan.predicted["batching"]
    assert batching["max_batch"] == 8 and set(batching["tiers"]) == {t.name for t in plan.tiers}
    # batching never predicts less than the best plan without it, which it beats here
    assert plan.predicted["throughput_rps"] > batching["unbatched_best"]["throughput_rps"]
    assert batching["unbatched_same_cuts"]["throughput_rps"] <= \
        batching["unbatched_best"]["throughput_rps"]
    assert plan.predicted["bottleneck_ms"] == pytest.approx(
        max(max(t["stage_ms"] for t in batching["tiers"].values()),
            max(result.best.evaluation.serialization_ms)), rel=1e-6)
    # the lone request's latency, as without batching
    alone = partition(resnet_path, tiers_file=ONE_MACHINE, objective="throughput",
                      use_calibration=False)
    assert alone.plan.version == 1 and "batching" not in alone.plan.predicted
    assert "max_batch" not in alone.plan.to_json()["objective"]
    assert all("batch" not in t for t in alone.plan.to_json()["tiers"])


def test_a_tier_after_the_batch_size_was_written_in_runs_lone_requests(tmp_path):
    path = tmp_path / "fixed.onnx"
    onnx.save(fixed_batch_model(), str(path))
    result = partition(path, ["device", "edge"], objective="throughput", max_batch=4,
                       privacy="none", pins={"first": "device", "flatten": "edge"},
                       use_calibration=False, out_dir=tmp_path / "plan")
    tiers = {t.name: t.batch for t in result.plan.tiers}
    assert tiers == {"device": 4, "edge": 1}
    why = result.plan.predicted["batching"]["tiers"]["edge"]["why_batch_1"]
    assert why == "node flatten (Reshape) cannot run in a batch"


def test_the_report_prints_each_tiers_batch_and_both_throughputs(resnet_path, tmp_path, capsys):
    assert main([str(resnet_path), "--tiers-file", ONE_MACHINE, "--objective", "throughput",
                 "--max-batch", "8", "--no-calibrate", "--no-verify",
                 "-o", str(tmp_path / "plan")]) == 0
    text = capsys.readouterr().out
    assert "dynamic batching: up to 8 requests per run" in text
    assert "throughput with batching" in text and "the best unbatched plan" in text
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["version"] == 2


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0", "--objective", "throughput"],
     "--max-batch must be an integer from 1 to 4096, not 0"),
    (["--max-batch", "8"], "--max-batch 8 plans for throughput under dynamic batching: it "
                           "needs --objective throughput, not latency"),
    (["--max-batch", "8", "--objective", "throughput", "--max-latency-ms", "50"],
     "--max-latency-ms bounds a lone request's latency"),
])
def test_bad_batch_settings_are_one_line(args, message, mlp_path, tmp_path, capsys):
    assert main([str(mlp_path), "--no-calibrate", "-o", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def batch_profile(path, graph, device, ms, batch):
    """A hand-written profile that says it ran at `batch` requests (its input_shapes)."""
    write_profile(path, graph, device, ms)
    document = json.loads(path.read_text())
    document["input_shapes"] = {name: [batch, *graph.tensors[name].shape[1:]]
                                for name in graph.inputs}
    path.write_text(json.dumps(document))
    return path


def test_a_profile_at_batch_n_prices_the_batched_tier(mlp_path, tmp_path):
    graph = Graph.load(mlp_path)
    profile = batch_profile(tmp_path / "edge8.json", graph, "box", 4.0, 8)
    result = partition(mlp_path, ["device", "edge"], objective="throughput", max_batch=8,
                       measured=_measured(graph, "edge", profile), use_calibration=False,
                       links=["device-edge=10gbit,0.1ms"])
    edge = result.plan.tier("edge")
    stage = result.plan.predicted["batching"]["tiers"]["edge"]["stage_ms"]
    assert edge.batch == 8 and stage == pytest.approx(len(edge.nodes) * 4.0 / 8)
    assert "at batch 8; batch 1 scaled by the roofline" in edge.cost_source


def test_profiles_of_one_machine_at_batch_1_and_n_give_both_columns(mlp_path, tmp_path, capsys):
    """`--profile edge=b1.json --profile edge=b8.json` of the same machine: one candidate,
    a lone request's times from the one, the batched times from the other."""
    graph = Graph.load(mlp_path)
    lone = batch_profile(tmp_path / "b1.json", graph, "box", 1.0, 1)
    eight = batch_profile(tmp_path / "b8.json", graph, "box", 2.0, 8)
    out = tmp_path / "plan"
    assert main([str(mlp_path), "--tiers", "device,edge", "--link", "device-edge=10gbit,0.1ms",
                 "--objective", "throughput", "--max-batch", "8", "--no-calibrate",
                 "--profile", f"edge={lone}", "--profile", f"edge={eight}",
                 "-o", str(out)]) == 0
    plan = load_plan(out)
    edge = plan.tier("edge")
    assert edge.cost_source == "measured (box) at batch 1 and 8"
    assert edge.profile["file"] == str(eight) and edge.profile["batch_1_file"] == str(lone)
    assert edge.predicted_compute_ms == pytest.approx(len(edge.nodes) * 1.0)
    assert plan.predicted["batching"]["tiers"]["edge"]["stage_ms"] == \
        pytest.approx(len(edge.nodes) * 2.0 / 8)
    # two profiles of one machine at one batch are a mistake, not two candidates
    again = batch_profile(tmp_path / "b8-again.json", graph, "box", 2.0, 8)
    assert main([str(mlp_path), "--tiers", "device,edge", "--objective", "throughput",
                 "--max-batch", "8", "--no-calibrate", "--profile", f"edge={eight}",
                 "--profile", f"edge={again}", "-o", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{again}: a second profile of machine 'box' at batch 8 for tier edge")


def _measured(graph, tier, path):
    from wpk.partitioner.measured import costs_from_profile

    return {tier: [costs_from_profile(graph, tier, path, warn=lambda _m: None)]}


@pytest.mark.parametrize("batch, max_batch, message", [
    (1, 8, "measured at batch 1, but the plan is for batches of 8 (--max-batch 8): profile at "
           "that batch (wpk-profile --input-shape features=8x2048)"),
    (None, 8, "measured at an unrecorded batch, but the plan is for batches of 8"),
    (8, 1, "measured at batch 8, but the plan is for lone requests (batch 1)"),
    (4, 8, "measured at batch 4, but the plan is for batches of 8"),
])
def test_a_profile_of_another_batch_is_refused_naming_the_file(mlp_path, tmp_path, batch,
                                                               max_batch, message, capsys):
    graph = Graph.load(mlp_path)
    path = tmp_path / "edge.json"
    if batch is None:
        write_profile(path, graph, "box", 1.0)
    else:
        batch_profile(path, graph, "box", 1.0, batch)
    objective = ["--objective", "throughput", "--max-batch", str(max_batch)] \
        if max_batch > 1 else []
    assert main([str(mlp_path), "--tiers", "device,edge", "--no-calibrate", *objective,
                 "--profile", f"edge={path}", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: {message}" in err, err


def test_a_version_1_plan_with_batching_fields_is_refused(resnet_path, tmp_path):
    partition(resnet_path, tiers_file=ONE_MACHINE, objective="throughput", max_batch=2,
              use_calibration=False, verify=False, out_dir=tmp_path)
    data = json.loads((tmp_path / "plan.json").read_text())
    data["version"] = 1
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(WpkError, match="objective.max_batch needs plan version 2"):
        load_plan(tmp_path)
