"""PartitionRequest: the CLI builds one, `partition(...)` is its keyword form."""
import dataclasses
import inspect

import pytest

from wpk.errors import WpkError
from wpk.partitioner import cli
from wpk.partitioner.api import execute, partition
from wpk.partitioner.request import PartitionRequest


def test_partition_keywords_are_the_request_fields():
    keywords = set(inspect.signature(partition).parameters)
    assert keywords == {f.name for f in dataclasses.fields(PartitionRequest)}


@pytest.mark.parametrize("fields, message", [
    ({"objective": "cheapest"},
     r"unknown objective 'cheapest' \(choose from latency, throughput, bandwidth\)"),
    ({"objective": "latncy"}, r"unknown objective 'latncy' \(did you mean 'latency'\? choose"),
    ({"privacy": "some"}, "unknown privacy mode 'some'"),
    ({"max_latency_ms": -1.0}, "must be a positive number"),
    ({"objective": "bandwidth"}, "needs a latency bound"),
])
def test_a_bad_goal_is_refused_before_the_model_is_read(fields, message):
    request = PartitionRequest(model="/no/such/model.onnx", **fields)
    with pytest.raises(WpkError, match=message):
        execute(request)


def test_the_cli_builds_the_request_once(mlp_path, tmp_path):
    args = cli.build_parser().parse_args(
        [str(mlp_path), "--tiers", "device,cloud", "--pin", "gemm_3=device", "--objective",
         "throughput", "--no-calibrate", "--no-verify", "-o", str(tmp_path / "out"),
         "--top", "2"])
    request = cli.request_from_args(args)
    assert request.tiers == ["device", "cloud"] and request.pins == {"gemm_3": "device"}
    assert request.objective == "throughput" and not request.use_calibration
    assert not request.verify and request.top == 2 and request.out_dir == tmp_path / "out"
    result = execute(request)
    assert result.plan.objective.name == "throughput"
    assert result.plan.tier("device").nodes[0] == "gemm_3"


def test_execute_and_partition_agree(mlp_path):
    by_keywords = partition(mlp_path, ["device", "edge"], use_calibration=False)
    by_request = execute(PartitionRequest(mlp_path, tiers=["device", "edge"],
                                          use_calibration=False))
    assert by_keywords.plan.to_json() == by_request.plan.to_json()
