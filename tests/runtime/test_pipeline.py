"""Tier servers chained on 127.0.0.1, driven by tritonclient.grpc and InferenceClient."""
from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from .conftest import Pipeline, fake_tier, reference
from wpk.plan import load_plan
from wpk.runtime import protocol as pb
from wpk.runtime import tier_core
from wpk.runtime.client import InferenceClient
from wpk.runtime.codecs import Codec


def triton_infer(address: str, model: str, feeds: dict[str, np.ndarray], **kwargs):
    client = triton.InferenceServerClient(address)
    inputs = []
    for name, array in feeds.items():
        tensor = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs, **kwargs)


def model_feeds(plan_dir, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape).astype(t.dtype)
            for t in load_plan(plan_dir).model.inputs}


def expect_error(code: grpc.StatusCode, fragment: str, call, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == f"StatusCode.{code.name}", info.value.message()
    assert fragment in info.value.message(), info.value.message()
    return info.value.message()


@pytest.mark.parametrize("name, link", [("resnet", "tcp"), ("mlp", "tcp"), ("dag", "tcp"),
                                        ("resnet", "grpc"), ("dag", "grpc")])
def test_tritonclient_through_pipeline_matches_whole_model(plans, name, link):
    """("grpc": the edge and the cloud tier behind another KServe server each, no tensor
    link: the tiers before them fall back to ModelInfer calls.)"""
    pipeline = Pipeline(plans[name], grpc_only=("edge", "cloud") if link == "grpc" else ())
    assert pipeline.services["device"].link.kind == "tcp"
    tiers = pipeline.plan.tiers
    if name == "dag":  # what this plan is here for: merging results from every tier
        assert all(t.results for t in tiers) and any(t.passthrough for t in tiers)
    if name == "resnet":
        assert tiers[1].passthrough == ["maxpool_9_out"]
    try:
        feeds = model_feeds(plans[name])
        expected = reference(plans[name], feeds)
        result = triton_infer(pipeline.entry, pipeline.plan.name, feeds)
        assert [o.name for o in result.get_response().outputs] == list(expected)
        for output, want in expected.items():
            np.testing.assert_allclose(result.as_numpy(output), want, rtol=1e-5, atol=1e-6)
        assert (pipeline.services["edge"].link.connection is None) == (link == "grpc")
    finally:
        pipeline.close()


def test_requested_output_subset_and_request_id(plans, resnet_pipeline):
    # resnet has one output: ask for it by name, and check the id is echoed
    feeds = model_feeds(plans["resnet"], seed=1)
    output = resnet_pipeline.plan.model.outputs[0].name
    result = triton_infer(resnet_pipeline.entry, "resnet_like", feeds,
                          outputs=[triton.InferRequestedOutput(output)], request_id="r-42")
    assert result.get_response().id == "r-42"
    np.testing.assert_allclose(result.as_numpy(output), reference(plans["resnet"], feeds)[output],
                               rtol=1e-5, atol=1e-6)


def test_each_tier_serves_its_slice_alone(plans, resnet_pipeline):
    import onnxruntime as ort

    plan = resnet_pipeline.plan
    device = plan.tiers[0]
    feeds = model_feeds(plans["resnet"], seed=2)
    result = triton_infer(resnet_pipeline.address["device"], "resnet_like.device", feeds)
    session = ort.InferenceSession(str(plans["resnet"] / device.slice))
    for name, want in zip(device.slice_outputs, session.run(device.slice_outputs, feeds)):
        np.testing.assert_array_equal(result.as_numpy(name), want)
    # the entry model lives on the entry tier only
    expect_error(grpc.StatusCode.NOT_FOUND, "tier 'edge' has no model 'resnet_like'",
                 triton_infer, resnet_pipeline.address["edge"], "resnet_like", feeds)


def test_metadata_reports_real_names_types_shapes(resnet_pipeline):
    client = triton.InferenceServerClient(resnet_pipeline.entry)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("resnet_like") and client.is_model_ready("resnet_like.device")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("resnet_like")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == \
        [("image", "FP32", [1, 3, 32, 32])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == \
        [("gemm_77_out", "FP32", [1, 10])]
    edge = triton.InferenceServerClient(resnet_pipeline.address["edge"]).get_model_metadata(
        "resnet_like.edge")
    assert [t.name for t in edge.inputs] == ["maxpool_9_out", "conv_12_out"]
    assert [t.name for t in edge.outputs] == ["maxpool_9_out", "conv_16_out"]
    assert list(edge.inputs[0].shape) == [1, 8, 8, 8]
    expect_error(grpc.StatusCode.NOT_FOUND, "has no model 'nope'", client.get_model_metadata,
                 "nope")


def test_readiness_and_health_follow_the_tier_core(resnet_pipeline):
    """ServerReady, ModelReady and grpc.health.v1 read one flag of the core: serving from
    start until the server begins to stop (health probes then see NOT_SERVING)."""
    from wpk.runtime.health import NOT_SERVING, SERVING, HealthCheckRequest, HealthCheckResponse

    address = resnet_pipeline.address["edge"]
    client = triton.InferenceServerClient(address)

    def health() -> int:
        with grpc.insecure_channel(address) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                        request_serializer=HealthCheckRequest.SerializeToString,
                                        response_deserializer=HealthCheckResponse.FromString)
            return check(HealthCheckRequest(service=""), timeout=5).status

    core = resnet_pipeline.services["edge"]
    assert client.is_server_ready() and client.is_model_ready("resnet_like.edge")
    assert health() == SERVING
    core.serving = False
    try:
        assert not client.is_server_ready() and not client.is_model_ready("resnet_like.edge")
        assert health() == NOT_SERVING
        assert client.is_server_live()
    finally:
        core.serving = True
    assert client.is_server_ready() and health() == SERVING


def test_typed_contents_are_accepted(plans, resnet_pipeline):
    feeds = model_feeds(plans["resnet"], seed=3)
    request = pb.ModelInferRequest(model_name="resnet_like")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=[1, 3, 32, 32])
    tensor.contents.fp32_contents.extend(feeds["image"].ravel().tolist())

    async def call():
        async with InferenceClient(resnet_pipeline.entry) as client:
            return await client.infer_message(request, timeout=10)

    response = asyncio.run(call())
    assert len(response.raw_output_contents) == 1  # answers raw, as tritonclient expects
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, reference(plans["resnet"], feeds)["gemm_77_out"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["fp16", "int8", "zstd", "fp16+zstd", "int8+zstd"])
def test_codec_round_trip_through_a_server(plans, resnet_pipeline, spec):
    """Send encoded tensors to the edge slice; its passthrough comes back as decoded there."""
    rng = np.random.default_rng(4)
    arrays = {"maxpool_9_out": rng.standard_normal((1, 8, 8, 8)).astype(np.float32) * 5,
              "conv_12_out": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)}

    async def call():
        async with InferenceClient(resnet_pipeline.address["edge"], codec=spec) as client:
            return await client.infer("resnet_like.edge", arrays, timeout=10)

    out = asyncio.run(call())
    sent = arrays["maxpool_9_out"]
    error = np.abs(out["maxpool_9_out"].astype(np.float64) - sent)
    assert np.all(error <= Codec.parse(spec).tolerance(sent))
    if spec == "zstd":
        assert error.max() == 0


def test_lossy_codecs_in_the_plan_stay_close_to_the_whole_model(plans):
    pipeline = Pipeline(plans["resnet_lossy"])
    try:
        feeds = model_feeds(plans["resnet_lossy"], seed=5)
        want = reference(plans["resnet_lossy"], feeds)["gemm_77_out"]
        got = triton_infer(pipeline.entry, "resnet_like", feeds).as_numpy("gemm_77_out")
        assert not np.array_equal(got, want)  # the codecs really ran
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    finally:
        pipeline.close()


@pytest.mark.parametrize("feeds, code, fragment", [
    ({"image": np.zeros((1, 3, 32), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT,
     "model 'resnet_like' input 'image': shape [1,3,32], expected [1,3,32,32]"),
    ({"image": np.zeros((1, 3, 32, 32), np.float64)}, grpc.StatusCode.INVALID_ARGUMENT,
     "input 'image': datatype FP64, expected FP32"),
    ({"pixels": np.zeros((1, 3, 32, 32), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT,
     "model 'resnet_like' has no input 'pixels' (inputs: image)"),
])
def test_bad_requests_get_precise_errors(resnet_pipeline, feeds, code, fragment):
    expect_error(code, fragment, triton_infer, resnet_pipeline.entry, "resnet_like", feeds)


def test_bad_messages_get_precise_errors(resnet_pipeline):
    stub_call = _raw_call(resnet_pipeline.entry)

    def request(**fields):
        message = pb.ModelInferRequest(model_name="resnet_like", **fields)
        return message

    short = request(raw_input_contents=[b"\0" * 100])
    short.inputs.add(name="image", datatype="FP32", shape=[1, 3, 32, 32])
    assert stub_call(short) == (grpc.StatusCode.INVALID_ARGUMENT,
                                "model 'resnet_like' input 'image': raw contents hold 100 "
                                "bytes, shape [1,3,32,32] FP32 needs 12288")
    missing = request()
    assert stub_call(missing) == (grpc.StatusCode.INVALID_ARGUMENT,
                                  "model 'resnet_like': missing input 'image'")
    extra = request(raw_input_contents=[b"", b""])
    extra.inputs.add(name="image", datatype="FP32", shape=[1, 3, 32, 32])
    assert stub_call(extra) == (grpc.StatusCode.INVALID_ARGUMENT, "model 'resnet_like': "
                                "raw_input_contents has 2 entries for 1 inputs")
    good = request(raw_input_contents=[b"\0" * 12288])
    good.inputs.add(name="image", datatype="FP32", shape=[1, 3, 32, 32])
    good.outputs.add(name="logits")
    assert stub_call(good) == (grpc.StatusCode.INVALID_ARGUMENT,
                               "model 'resnet_like' has no output 'logits' (outputs: gemm_77_out)")
    unknown = pb.ModelInferRequest(model_name="resnet")
    assert stub_call(unknown) == (grpc.StatusCode.NOT_FOUND, "tier 'device' has no model "
                                  "'resnet' (models: resnet_like, resnet_like.device)")


@pytest.mark.parametrize("codec, scale, message", [
    ("raw+zstd", None, "raw+zstd contents are not a zstd frame"),
    ("int8", "half", "wpk_scale must be a finite number, not 'half'"),
    ("int8", float("nan"), "wpk_scale must be a finite number, not nan"),
    ("gzip", None, "gzip"),
])
def test_bad_codec_parameters_are_the_clients_fault(resnet_pipeline, codec, scale, message):
    """Garbage behind wpk_codec, or a scale that is no number, once came back UNKNOWN with a
    Python exception's name: they are INVALID_ARGUMENT, in plain words."""
    stub_call = _raw_call(resnet_pipeline.entry)
    bad = pb.ModelInferRequest(model_name="resnet_like", raw_input_contents=[b"\x07" * 3072])
    tensor = bad.inputs.add(name="image", datatype="FP32", shape=[1, 3, 32, 32])
    tensor.parameters["wpk_codec"].string_param = codec
    if isinstance(scale, str):
        tensor.parameters["wpk_scale"].string_param = scale
    elif scale is not None:
        tensor.parameters["wpk_scale"].double_param = scale
    status, text = stub_call(bad)
    assert status == grpc.StatusCode.INVALID_ARGUMENT, text
    assert text.startswith("model 'resnet_like' input 'image': ") and message in text, text
    assert "Error" not in text and "Traceback" not in text


def _raw_call(address: str):
    def call(message):
        with grpc.insecure_channel(address) as channel:
            try:
                pb.Stub(channel).ModelInfer(message, timeout=10)
            except grpc.RpcError as error:
                return error.code(), error.details()
        return grpc.StatusCode.OK, ""
    return call


class SlowPeer:
    """A gRPC server that takes `delay` seconds to answer anything (but ServerMetadata, with
    `metadata_too=False`: then it advertises no tensor link at once): a slow downstream
    tier."""

    def __init__(self, delay: float = 30.0, metadata_too: bool = True):
        released = self.released = threading.Event()   # set by close(): handlers end

        class Slow:
            def __getattr__(self, method):
                def handler(request, context):
                    context.set_code(grpc.StatusCode.OK)
                    if metadata_too or method != "ServerMetadata":
                        released.wait(delay)
                    return pb.METHODS[method][1]()
                return handler

        self.server, self.address = fake_tier(Slow(), workers=4)

    def close(self):
        self.released.set()
        self.server.stop(0)


@pytest.mark.parametrize("link", ["tcp", "grpc"])
def test_hung_downstream_gives_deadline_exceeded_naming_the_tier(plans, link, monkeypatch):
    """(tcp: the hung peer's ServerMetadata is what times out; grpc: it advertises no tensor
    link, and the ModelInfer call hangs.) The tier's margin is widened so that a loaded
    machine still gets its error to the caller first."""
    monkeypatch.setattr(tier_core, "DEADLINE_MARGIN_S", 0.3)
    peer = SlowPeer(metadata_too=link == "tcp")
    pipeline = Pipeline(plans["resnet"], hop_timeout=1.0, next_override={"device": peer.address})
    try:
        feeds = model_feeds(plans["resnet"])
        # the caller's deadline travels down the chain
        message = expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, "tier 'edge' at " + peer.address,
                               triton_infer, pipeline.entry, "resnet_like", feeds,
                               client_timeout=2.0)
        assert "deadline exceeded waiting for" in message
        # without a deadline the hop timeout applies: an error, never a hang
        expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, "tier 'edge'", triton_infer,
                     pipeline.entry, "resnet_like", feeds)
        assert triton.InferenceServerClient(pipeline.entry).is_server_live()
    finally:
        pipeline.close()
        peer.close()


@pytest.mark.parametrize("link", ["tcp", "grpc"])
def test_stopped_downstream_gives_unavailable_naming_the_tier(plans, link):
    """(grpc: the cloud tier behind another KServe server, reached with ModelInfer calls.)"""
    pipeline = Pipeline(plans["mlp"], grpc_only=("cloud",) if link == "grpc" else ())
    try:
        feeds = model_feeds(plans["mlp"])
        triton_infer(pipeline.entry, "mlp", feeds)
        pipeline.stop_tier("cloud")
        message = expect_error(grpc.StatusCode.UNAVAILABLE, "tier 'cloud' at", triton_infer,
                               pipeline.entry, "mlp", feeds, client_timeout=10)
        assert "unavailable" in message
        # the entry tier is still up and its own slice still answers
        assert triton_infer(pipeline.entry, "mlp.device", feeds).as_numpy(
            pipeline.plan.tiers[0].forward[0]) is not None
    finally:
        pipeline.close()


def test_metrics_endpoint_counts_requests_and_bytes(plans, resnet_pipeline):
    feeds = model_feeds(plans["resnet"], seed=6)
    triton_infer(resnet_pipeline.entry, "resnet_like", feeds)
    with pytest.raises(InferenceServerException):
        triton_infer(resnet_pipeline.entry, "missing", feeds)
    # a request is counted once answered: the caller may read its answer a moment before
    wanted = ['wpk_requests_total{tier="device",model="resnet_like",code="OK"}',
              'wpk_requests_total{tier="device",model="missing",code="NOT_FOUND"}']
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(resnet_pipeline.metrics_url["device"],
                                      timeout=5).read().decode()
        lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                     if not line.startswith("#"))
        if all(w in lines for w in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert int(lines['wpk_requests_total{tier="device",model="resnet_like",code="OK"}']) >= 1
    assert int(lines['wpk_requests_total{tier="device",model="missing",code="NOT_FOUND"}']) == 1
    assert int(lines['wpk_request_seconds_count{tier="device",model="resnet_like"}']) >= 1
    assert int(lines['wpk_bytes_total{tier="device",direction="in"}']) >= 12288
    assert int(lines['wpk_bytes_total{tier="device",direction="forward"}']) >= 2 * 2048
    edge_ok = 'wpk_requests_total{tier="edge",model="resnet_like.edge",code="OK"}'
    while True:
        edge = urllib.request.urlopen(resnet_pipeline.metrics_url["edge"],
                                      timeout=5).read().decode()
        if edge_ok in edge or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert edge_ok in edge


def test_tritonclient_stream_api_against_the_entry_tier(plans, resnet_pipeline):
    import queue

    answers: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(resnet_pipeline.entry)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        feeds = [model_feeds(plans["resnet"], seed=10 + i) for i in range(3)]
        for i, feed in enumerate(feeds):
            tensor = triton.InferInput("image", [1, 3, 32, 32], "FP32")
            tensor.set_data_from_numpy(feed["image"])
            client.async_stream_infer("resnet_like", [tensor], request_id=str(i))
        bad = triton.InferInput("image", [1, 3, 32, 32], "FP32")
        bad.set_data_from_numpy(feeds[0]["image"])
        client.async_stream_infer("nope", [bad], request_id="bad")
        got = [answers.get(timeout=10) for _ in range(4)]
    finally:
        client.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "has no model 'nope'" in errors[0].message()
    for result, error in got:
        if error is None:
            i = int(result.get_response().id)
            np.testing.assert_allclose(result.as_numpy("gemm_77_out"),
                                       reference(plans["resnet"], feeds[i])["gemm_77_out"],
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("link", [False, True])
def test_inference_client_errors_carry_status_and_message(plans, resnet_pipeline, link):
    from wpk.runtime.status import TierError

    feeds = model_feeds(plans["resnet"], seed=7)

    async def calls():
        async with InferenceClient(resnet_pipeline.entry, tensor_link=link,
                                   timeout=10) as client:
            outputs = await client.infer("resnet_like", feeds)
            meta = await client.model_metadata("resnet_like")
            with pytest.raises(TierError) as missing:
                await client.infer("nope", feeds)
            with pytest.raises(TierError) as wrong:
                await client.infer("resnet_like", {"image": feeds["image"][..., :16]})
            return outputs, meta, missing.value, wrong.value

    outputs, meta, missing, wrong = asyncio.run(calls())
    np.testing.assert_allclose(outputs["gemm_77_out"],
                               reference(plans["resnet"], feeds)["gemm_77_out"], rtol=1e-5,
                               atol=1e-6)
    assert [m.name for m in meta.inputs] == ["image"] and meta.outputs[0].shape == (1, 10)
    assert missing.code == grpc.StatusCode.NOT_FOUND and "has no model 'nope'" in missing.details
    assert wrong.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "shape [1,3,32,16], expected [1,3,32,32]" in wrong.details


def test_optimized_tier_loads_through_the_optimizer_or_fails_in_one_line(plans, tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    from wpk.errors import WpkError
    from wpk.runtime.tier_core import TierCore

    plan_dir = tmp_path / "plan"
    shutil.copytree(plans["mlp"], plan_dir)
    # a plan without `optimized` never imports the optimizer
    code = ("import sys; from wpk.plan import load_plan; from wpk.runtime.tier_core import "
            f"TierCore; TierCore(load_plan({str(plan_dir)!r}), {str(plan_dir)!r}, 'cloud', "
            "None); print('wpk.optimizer' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    data = json.loads((plan_dir / "plan.json").read_text())
    data["tiers"][2]["optimized"] = "cloud.opt"
    (plan_dir / "plan.json").write_text(json.dumps(data))
    with pytest.raises(WpkError, match="tier 'cloud'.*cloud.opt"):
        TierCore(load_plan(plan_dir), plan_dir, "cloud", None)
    (plan_dir / "cloud.opt").mkdir()
    try:
        service = TierCore(load_plan(plan_dir), plan_dir, "cloud", None)
    except WpkError as error:  # no optimizer yet, or an empty directory it rejects
        assert "tier 'cloud'" in str(error)
    else:
        assert hasattr(service.runner, "run")


def test_tiers_of_different_plans_give_internal_naming_both_tiers(plans):
    other = Pipeline(plans["mlp"])
    pipeline = Pipeline(plans["resnet"], next_override={"device": other.address["edge"]})
    try:
        message = expect_error(grpc.StatusCode.INTERNAL, "rejected what tier 'device' forwarded",
                               triton_infer, pipeline.entry, "resnet_like",
                               model_feeds(plans["resnet"]))
        assert "tier 'edge' has no model 'resnet_like.edge'" in message
    finally:
        pipeline.close()
        other.close()


def slice_runs(pipeline: Pipeline, tier: str) -> int:
    text = urllib.request.urlopen(pipeline.metrics_url[tier], timeout=5).read().decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return int(lines[f'wpk_slice_seconds_count{{tier="{tier}"}}'])


@pytest.mark.parametrize("model, tier", [("resnet_like", "device"),
                                         ("resnet_like.cloud", "cloud")])
def test_a_deadline_past_before_the_slice_runs_gives_deadline_exceeded(plans, resnet_pipeline,
                                                                       model, tier):
    """The deadline (`wpk_timeout_ms`, as tiers send it) is checked before the slice runs:
    an expired request is not computed, whether it enters the pipeline or one tier's slice."""
    plan = resnet_pipeline.plan
    if tier == "device":
        feeds = model_feeds(plans["resnet"])
    else:
        feeds = {n: np.ones(plan.tensors[n].shape, dtype=plan.tensors[n].dtype)
                 for n in plan.tier(tier).inputs}
    before = slice_runs(resnet_pipeline, tier)

    def call(timeout_ms: float):
        """One request on a ModelStreamInfer stream: (error_message, wpk_status)."""
        from wpk.runtime.client import channel_options
        from wpk.runtime.infer_messages import build_request

        request = build_request(model, feeds, parameters={"wpk_timeout_ms": timeout_ms})
        with grpc.insecure_channel(resnet_pipeline.address[tier],
                                   options=channel_options()) as channel:
            answer = next(iter(pb.Stub(channel).ModelStreamInfer(iter([request]))))
        status = answer.infer_response.parameters.get("wpk_status")
        return answer.error_message, status.int64_param if status is not None else 0

    # 1 ns left: gone by the time the tier looks at it (and no client-side timer)
    message, status = call(1e-6)
    assert status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], message
    assert message == f"tier {tier!r}: deadline exceeded before its slice ran"
    assert slice_runs(resnet_pipeline, tier) == before
    assert call(10_000.0) == ("", 0)       # with time to spare: answered
    assert slice_runs(resnet_pipeline, tier) == before + 1


@pytest.mark.parametrize("deliver_to", ["edge", "cloud"])
def test_deliver_to_a_later_tier_still_answers_the_caller(tmp_path, deliver_to):
    """`objective.deliver_to` beyond the first tier: the model outputs are complete on that
    tier (its `results`), and they travel back so that the entry tier answers the caller."""
    from wpk.examples import random_dag
    from .conftest import make_plan

    plan_dir = make_plan(random_dag(40, width=16, seed=3), tmp_path / deliver_to,
                         {"relu_17": "device", "relu_26": "edge", "add_27": "edge",
                          "add_40": "cloud"}, deliver_to=deliver_to)
    plan = load_plan(plan_dir)
    outputs = [t.name for t in plan.model.outputs]
    assert plan.objective.deliver_to == deliver_to
    assert plan.tiers[0].results == []             # nothing is delivered on the device
    delivered = set(plan.tier(deliver_to).results)
    assert delivered | {o for t in plan.tiers[plan.tier_index(deliver_to) + 1:]
                        for o in t.results} == set(outputs)
    pipeline = Pipeline(plan_dir)
    try:
        feeds = model_feeds(plan_dir, seed=4)
        expected = reference(plan_dir, feeds)
        answer = triton_infer(pipeline.entry, plan.name, feeds)
        for name in outputs:
            np.testing.assert_allclose(answer.as_numpy(name), expected[name], rtol=1e-4,
                                       atol=1e-5)
    finally:
        pipeline.close()


@pytest.mark.parametrize("run", ["alone", "thread", "inline"])
def test_every_slice_placement_answers_a_burst_exactly(plans, run):
    """--run alone (auto's choice on 4+ cores) runs a request's slice on the event loop while
    it is the only one in flight and in the worker once others wait; the answers must not
    depend on where the slice ran."""
    pipeline = Pipeline(plans["resnet"], run=run)
    entry = pipeline.services["device"]
    assert entry.placement == run
    burst = [model_feeds(plans["resnet"], seed=seed) for seed in range(16)]

    async def calls():
        async with InferenceClient(pipeline.entry, timeout=20) as client:
            alone = await client.infer("resnet_like", burst[0])
            runs_alone = dict(entry.slice_runs)
            together = await asyncio.gather(*(client.infer("resnet_like", f) for f in burst))
            return [alone, *together], runs_alone

    try:
        answers, runs_alone = asyncio.run(calls())
    finally:
        pipeline.close()
    for answer, feeds in zip(answers, [burst[0], *burst]):
        np.testing.assert_allclose(answer["gemm_77_out"],
                                   reference(plans["resnet"], feeds)["gemm_77_out"],
                                   rtol=1e-5, atol=1e-6)
    if run == "alone":
        assert runs_alone == {"loop": 1, "worker": 0}
        assert entry.slice_runs["worker"] > 0, entry.slice_runs
    else:
        assert entry.slice_runs[{"thread": "worker", "inline": "loop"}[run]] == 17


def test_alone_never_runs_a_slice_beside_one_a_gone_request_left_in_the_worker(plans):
    """A request that gives up (deadline, caller gone) while its slice runs in the worker
    leaves that slice running: the next request, alone in flight, must queue behind it in the
    worker (`--workers 1`: one slice at a time), not start a second slice on the loop."""
    from wpk.plan import load_plan
    from wpk.runtime.tier_core import TierCore

    service = TierCore(load_plan(plans["resnet"]), plans["resnet"], "cloud", None,
                          run="alone")
    release, running = threading.Event(), []
    overlaps, threads = [], []

    def gated_slice(arrays, deadline=None):   # stands in for a slow slice
        overlaps.append(len(running))
        running.append(1)
        threads.append(threading.current_thread())
        release.wait(10)
        running.pop()
        return dict(arrays)

    service._slice = gated_slice

    async def scenario():
        service.in_flight = 2                 # another request is in flight: to the worker
        first = asyncio.ensure_future(service._run_slice({}))
        await until(lambda: running)          # its slice has started in the worker
        first.cancel()                        # its caller gives up; the slice runs on
        service.in_flight = 1                 # the next request is alone in flight
        second = asyncio.ensure_future(service._run_slice({}))
        await asyncio.sleep(0.05)
        release.set()
        await second
        await until(lambda: service.in_worker == 0)   # the worker's done-callbacks
        return threading.current_thread()

    async def until(condition, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    try:
        loop_thread = asyncio.run(scenario())
    finally:
        service.executor.shutdown(wait=True)
    assert overlaps == [0, 0] and all(t is not loop_thread for t in threads)
    assert service.in_worker == 0 and service.slice_runs == {"loop": 0, "worker": 2}
