"""Payload formats, topics and the CLI's route parsing (no broker needed)."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from wpk.errors import WpkError
from wpk.bridge.cli import build_parser, config_from_args
from wpk.bridge.formats import (JsonFormat, NpyFormat, PayloadError, RawFormat,
                                        encode_result)
from wpk.bridge.sparkplug import DataType, SparkplugFormat, make_metric, make_payload
from wpk.bridge.topics import TopicTemplate, matches
from wpk.plan import SourceModel
from wpk.tensor_spec import TensorSpec

ONE = SourceModel("m", inputs=(TensorSpec.from_kserve("x", "FP32", (-1, 4)),),
                  outputs=(TensorSpec.from_kserve("y", "FP32", (-1,)),))
TWO = SourceModel("m2", inputs=(TensorSpec.from_kserve("a", "INT64", (2,)),
                                TensorSpec.from_kserve("b", "FP32", (1, 3))),
                  outputs=(TensorSpec.from_kserve("y", "FP32", (1,)),))


def decode(fmt, payload, signature=ONE, topic="t"):
    return fmt.to_inputs(fmt.parse(topic, payload), signature)


def test_topic_filters_and_templates():
    assert matches("plant/+/camera", "plant/l1/camera")
    assert not matches("plant/+/camera", "plant/l1/x/camera")
    assert matches("plant/#", "plant/a/b") and not matches("#", "$SYS/broker")
    template = TopicTemplate("plant/{1}/inference/{topic}")
    assert template.render("plant/l7/camera") == "plant/l7/inference/plant/l7/camera"
    with pytest.raises(WpkError, match="reads level 3"):
        TopicTemplate("x/{3}").check_against("a/+/c")
    with pytest.raises(WpkError, match="unknown field"):
        TopicTemplate("x/{line}")


def test_raw_little_endian_fills_the_free_dimension():
    data = np.arange(8, dtype="<f4")
    (x,) = decode(RawFormat(), data.tobytes()).values()
    assert x.shape == (2, 4) and x.dtype == np.float32
    np.testing.assert_array_equal(x.ravel(), data)
    with pytest.raises(PayloadError, match="does not fit"):
        decode(RawFormat(), np.zeros(3, "<f4").tobytes())
    with pytest.raises(PayloadError, match="2 inputs"):
        decode(RawFormat(), data.tobytes(), TWO)


def test_npy_and_npz():
    buffer = io.BytesIO()
    np.save(buffer, np.ones((1, 4), np.float64))
    (x,) = decode(NpyFormat(), buffer.getvalue()).values()
    assert x.dtype == np.float32 and x.shape == (1, 4)
    buffer = io.BytesIO()
    np.savez(buffer, a=np.array([1, 2]), b=np.zeros(3))
    out = decode(NpyFormat(), buffer.getvalue(), TWO)
    assert out["a"].dtype == np.int64 and out["b"].shape == (1, 3)
    with pytest.raises(PayloadError, match="not a .npy"):
        decode(NpyFormat(), b"hello")


def test_json_both_shapes_and_echo():
    fmt = JsonFormat()
    parsed = fmt.parse("t", json.dumps({"inputs": {"x": [[1, 2, 3, 4]]}, "id": "a7",
                                        "timestamp": 1700000000000}).encode())
    assert parsed.echo == {"id": "a7"} and parsed.source_timestamp_ms == 1700000000000
    assert fmt.to_inputs(parsed, ONE)["x"].dtype == np.float32
    kserve = {"inputs": [{"name": "a", "shape": [2], "datatype": "INT64", "data": [5, 6]},
                         {"name": "b", "data": [1, 2, 3]}]}
    out = decode(fmt, json.dumps(kserve).encode(), TWO)
    assert out["a"].tolist() == [5, 6] and out["b"].shape == (1, 3)
    with pytest.raises(PayloadError, match="rectangular"):
        decode(fmt, b'{"inputs": {"x": [[1, 2], [3]]}}')


def test_sparkplug_aliases_report_by_exception_and_types():
    fmt = SparkplugFormat()
    birth = make_payload([make_metric("t", np.float32(1.5), alias=1),
                          make_metric("n", np.int32(-3), datatype=DataType.Int32, alias=2),
                          make_metric("v", np.array([1, 2], "<i2"), alias=3),
                          make_metric("name", "pump", alias=4)], seq=0)
    assert not fmt.parse("spBv1.0/g/DBIRTH/e/d", birth).infer
    parsed = fmt.parse("spBv1.0/g/DDATA/e/d", make_payload(
        [make_metric(None, np.int32(-7), datatype=DataType.Int32, alias=2)], seq=1))
    x = fmt.to_inputs(parsed, ONE)["x"]
    assert x.tolist() == [[1.5, -7, 1, 2]]  # BIRTH order; string metric left out
    ordered = SparkplugFormat(metrics=["v", "n", "t"])
    ordered.parse("spBv1.0/g/DBIRTH/e/d", birth)
    parsed = ordered.parse("spBv1.0/g/DDATA/e/d", make_payload([], seq=1))
    assert ordered.to_inputs(parsed, ONE)["x"].tolist() == [[1, 2, -3, 1.5]]
    # by name: every model input is a metric
    fmt.parse("spBv1.0/g/NBIRTH/e", make_payload(
        [make_metric("a", np.array([4, 5], "<i8")), make_metric("b", np.zeros(3, "<f4"))],
        seq=0))
    out = fmt.to_inputs(fmt.parse("spBv1.0/g/NDATA/e", make_payload([], seq=1)), TWO)
    assert out["a"].tolist() == [4, 5] and out["b"].shape == (1, 3)
    # a node rebirth forgets its devices; a death forgets the node
    fmt.parse("spBv1.0/g/NBIRTH/e", make_payload([], seq=0))
    with pytest.raises(PayloadError, match="before its BIRTH"):
        fmt.parse("spBv1.0/g/DDATA/e/d", make_payload([], seq=1))
    with pytest.raises(PayloadError, match="unknown alias"):
        fmt.parse("spBv1.0/g/NDATA/e", make_payload([make_metric(None, 1.0, alias=9)], seq=2))


def test_sparkplug_seq_gap_counted_and_bad_topics():
    fmt = SparkplugFormat()
    fmt.parse("spBv1.0/g/NBIRTH/e", make_payload([make_metric("a", 1.0)], seq=0))
    fmt.parse("spBv1.0/g/NDATA/e", make_payload([], seq=1))
    fmt.parse("spBv1.0/g/NDATA/e", make_payload([], seq=5))
    assert fmt.sequence_gaps == 1
    for topic in ("spBv1.0/g/NDATA", "spBv1.0/g/XDATA/e", "spBv1.0/g/DDATA/e",
                  "other/g/NDATA/e"):
        with pytest.raises(PayloadError):
            fmt.parse(topic, make_payload([]))


@pytest.mark.parametrize("payload, message", [
    (b'{"inputs": {"x": [1, NaN, 3, 4]}}', "NaN is not a JSON number"),
    (b'{"inputs": {"x": [1, 2, -Infinity, 4]}}', "-Infinity is not a JSON number"),
    (b'{"inputs": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", "nested too deeply"),
])
def test_json_that_is_not_json_or_too_deep_is_a_payload_error(payload, message):
    with pytest.raises(PayloadError, match=message):
        decode(JsonFormat(), payload)


def test_complex_values_are_refused_not_cast_to_real():
    buffer = io.BytesIO()
    np.save(buffer, np.array([[1 + 2j, 3, 4, 5]]))
    with pytest.raises(PayloadError, match="expected FP32 numbers, got complex128"):
        decode(NpyFormat(), buffer.getvalue())


def test_json_results_stay_json_when_a_model_outputs_nan_or_infinity():
    outputs = {"y": np.array([1.5, np.nan, np.inf, -np.inf], dtype=np.float32)}
    document = json.loads(encode_result("json", outputs, {"id": 1}),
                          parse_constant=lambda c: pytest.fail(f"{c} in the result"))
    assert document["outputs"]["y"] == [1.5, "NaN", "Infinity", "-Infinity"]


def test_results_json_raw_npy():
    outputs = {"y": np.array([1.0, 2.0], np.float32)}
    document = json.loads(encode_result("json", outputs, {"seq": 3}))
    assert document == {"seq": 3, "outputs": {"y": [1.0, 2.0]}}
    assert encode_result("raw", outputs, {}) == np.array([1, 2], "<f4").tobytes()
    assert np.load(io.BytesIO(encode_result("npy", outputs, {}))).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="--output"):
        encode_result("raw", {"a": np.zeros(1), "b": np.zeros(1)}, {})


def parse_cli(argv):
    return config_from_args(build_parser().parse_args(argv))


def test_cli_routes_take_the_options_that_follow_them():
    config = parse_cli(["--broker", "127.0.0.1:1884", "--pipeline", "127.0.0.1:8001",
                        "--model", "m", "--result", "raw",
                        "--subscribe", "a/+/cam", "--format", "raw", "--publish", "a/{1}/out",
                        "--subscribe", "spBv1.0/g/DDATA/+/+", "--format", "sparkplug",
                        "--publish", "b/{4}", "--result", "json", "--metrics", "x, y"])
    first, second = config.routes
    assert (first.format, first.result, first.model) == ("raw", "raw", "m")
    assert (second.format, second.result, second.metrics) == ("sparkplug", "json", ["x", "y"])
    assert config.broker.port == 1884 and config.queue_policy == "block"


def test_cli_config_file(tmp_path):
    path = tmp_path / "bridge.yaml"
    path.write_text("broker: 127.0.0.1:1999\npipeline: 127.0.0.1:8001\nmodel: m\n"
                    "queue-size: 50\nqueue-policy: drop-oldest\nroutes:\n"
                    "  - {subscribe: 'x/+', publish: 'y/{1}', format: npy}\n")
    config = parse_cli(["--config", str(path)])
    assert config.queue_size == 50 and config.queue_policy == "drop-oldest"
    assert not config.pipeline_tensor_link
    path.write_text(path.read_text() + "tensor-link: true\n")
    assert parse_cli(["--config", str(path)]).pipeline_tensor_link
    assert config.routes[0].format == "npy" and config.routes[0].model == "m"


@pytest.mark.parametrize("argv, message", [
    (["--pipeline", "127.0.0.1:1"], "no --subscribe"),
    (["--pipeline", "nope", "--subscribe", "a", "--publish", "b", "--model", "m"], "HOST:PORT"),
    (["--pipeline", "h:1", "--subscribe", "a/#/b", "--publish", "b", "--model", "m"],
     "'#' must be the last"),
    (["--pipeline", "h:1", "--subscribe", "a/+", "--publish", "b/{2}", "--model", "m"],
     "reads level 2"),
    (["--pipeline", "h:1", "--subscribe", "a", "--publish", "b"], "no --model"),
    (["--pipeline", "h:1", "--tls-ca", "/nonexistent", "--subscribe", "a", "--publish", "b",
      "--model", "m"], "no such file"),
    (["--pipeline", "h:1", "--subscribe", "a/+", "--publish", "r/{x", "--model", "m"],
     "expected '}' before end of string"),
    (["--pipeline", "h:1", "--subscribe", "a/+", "--publish", "r/{1}", "--model", "m",
      "--client-id", " "], "--client-id must not be empty"),
    (["--pipeline", "h:1", "--subscribe", "a/+", "--publish", "r/{1}", "--model", "m",
      "--tls-insecure"], "add --tls"),
    (["--pipeline", "h:1", "--subscribe", "a/+", "--publish", "r/{1}", "--model", "m",
      "--error-topic", "e/#"], "has no wildcards"),
    (["--pipeline", "h:1", "--subscribe", "a/+", "--publish", "r/{1}", "--model", "m",
      "--tensor-link", "--pipeline-tls", "/tmp"], "the tensor link is plain TCP"),
])
def test_cli_errors_are_one_line(argv, message):
    with pytest.raises(WpkError, match=message):
        parse_cli(argv)


@pytest.mark.parametrize("text, message", [
    ("routes: 5\n", "'routes' must be a list"),
    ("brokr: 127.0.0.1:1883\n", "unknown setting 'brokr' \\(did you mean 'broker'\\?\\)"),
    ("broker: [\n", "malformed YAML at line"),
    (b"\xff\xfe\x00", "not UTF-8"),
    ("broker: 5\n", "'broker' must be a string \\(quote it in YAML\\), not 5"),
    ("queue-size: abc\n", "'queue-size' must be an integer, not 'abc'"),
    ("tls: maybe\n", "'tls' must be true or false"),
    ("routes: [{subscribe: 5}]\n", "routes\\[0\\]: 'subscribe' must be a string"),
])
def test_config_file_errors_name_the_file(text, message, tmp_path):
    path = tmp_path / "bridge.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text("pipeline: 127.0.0.1:8001\n" + text)
    with pytest.raises(WpkError, match=message) as info:
        parse_cli(["--config", str(path), "--subscribe", "a/+", "--publish", "b/{1}",
                   "--model", "m"])
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fields, message", [
    ({"format": "jsn"}, r"subscription 'a/\+': unknown format 'jsn' \(did you mean 'json'\? "
                        r"choose from raw, npy, json, sparkplug\)"),
    ({"result": "zip"}, r"unknown result format 'zip' \(choose from json, "),
])
def test_a_routes_unknown_format_names_the_choices_and_the_closest(fields, message):
    from wpk.bridge.config import Route

    route = Route("a/+", "b/{1}", model="m", **fields)
    with pytest.raises(WpkError, match=message):
        route.check()


def test_cli_exit_code_and_message():
    run = subprocess.run([sys.executable, "-m", "wpk.bridge.cli", "--pipeline", "h:1",
                          "--subscribe", "a/+", "--publish", "b/{5}", "--model", "m"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "wpk: error:" in run.stderr and "Traceback" not in run.stderr


def test_generated_sparkplug_code_is_current():
    pytest.importorskip("grpc_tools")
    run = subprocess.run([sys.executable, "-m", "wpk.bridge.protogen", "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
