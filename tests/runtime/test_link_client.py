"""LinkClient: clients entering the pipeline over the entry tier's tensor link (real tier
servers on 127.0.0.1, real ONNX Runtime sessions)."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from .conftest import Pipeline, reference
from .test_pipeline import model_feeds
from wpk.runtime import protocol as pb
from wpk.runtime.client import InferenceClient
from wpk.runtime.link import InferenceError
from wpk.runtime.link_client import LinkClient
from wpk.runtime.tensor_link import EXTENSION_PREFIX


DAG = "random_dag_40"   # the plan's model name (the ONNX file's stem)


def check(answer: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(answer) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(answer[name], value, rtol=1e-5, atol=1e-6)


async def failure(call) -> InferenceError:
    with pytest.raises(InferenceError) as info:
        await call
    return info.value


@pytest.fixture(scope="module")
def dag_pipeline(plans):
    pipeline = Pipeline(plans["dag"])
    yield pipeline
    pipeline.close()


def test_entry_tier_advertises_its_tensor_link(dag_pipeline):
    async def extensions():
        async with InferenceClient(dag_pipeline.entry) as client:
            return (await client.stub.ServerMetadata(pb.ServerMetadataRequest())).extensions

    port = dag_pipeline.services["device"].link_server.port
    assert f"{EXTENSION_PREFIX}{port}" in asyncio.run(extensions())


def test_many_requests_over_the_entry_link_match_the_whole_model(dag_pipeline, plans):
    """48 requests in flight at once over the tensor link, interleaved with gRPC requests:
    each gets its own answer (the dag has model outputs on every tier). The entry tier
    forwards link requests on a threaded connection, gRPC ones on its loop's."""
    feeds = [model_feeds(plans["dag"], seed=200 + i) for i in range(48)]

    async def run_all():
        async with LinkClient(dag_pipeline.entry, timeout=30) as client, \
                InferenceClient(dag_pipeline.entry, stream=True, timeout=30) as grpc_client:
            calls = [(client if i % 3 else grpc_client).infer(DAG, f)
                     for i, f in enumerate(feeds)]
            return await asyncio.gather(*calls), client.transport

    answers, transport = asyncio.run(run_all())
    assert transport == "tcp"
    for feed, answer in zip(feeds, answers):
        check(answer, reference(plans["dag"], feed))
    connections = dag_pipeline.services["device"].link.connections
    assert connections[True].threaded and not connections[False].threaded
    assert connections[True].error is None and connections[False].error is None


def test_a_slice_model_runs_the_pipeline_from_its_tier(dag_pipeline, plans):
    """`dag.edge` over the link at the edge tier: the edge's slice and the cloud's, as
    `wpk_pipeline` gives over gRPC."""
    tier = dag_pipeline.plan.tiers[1]
    arrays = dict(model_feeds(plans["dag"], seed=7))
    for t in dag_pipeline.plan.tiers[:1]:   # what the device forwards, computed here
        from wpk.plan import slice_path
        import onnxruntime as ort

        session = ort.InferenceSession(str(slice_path(plans["dag"], t)),
                                       providers=["CPUExecutionProvider"])
        arrays.update(zip(t.slice_outputs, session.run(t.slice_outputs,
                                                      {n: arrays[n] for n in t.slice_inputs})))
    inputs = {n: arrays[n] for n in tier.inputs}

    async def both():
        async with LinkClient(dag_pipeline.address["edge"], timeout=30) as client, \
                InferenceClient(dag_pipeline.address["edge"], timeout=30) as grpc_client:
            return (await client.infer(f"{DAG}.edge", inputs),
                    await grpc_client.infer(f"{DAG}.edge", inputs,
                                            parameters={"wpk_pipeline": True}))

    over_link, over_grpc = asyncio.run(both())
    check(over_link, over_grpc)


def test_bad_requests_get_precise_errors(dag_pipeline, plans):
    feeds = model_feeds(plans["dag"])
    name, array = next(iter(feeds.items()))

    async def errors():
        async with LinkClient(dag_pipeline.entry, timeout=10) as client:
            return [
                await failure(client.infer("nope", feeds)),
                await failure(client.infer(DAG, {**feeds, name: array[..., :-1]})),
                await failure(client.infer(DAG, {**feeds, name: array.astype(np.float64)})),
                await failure(client.infer(DAG, {})),
                await failure(client.infer(DAG, feeds, outputs=["not_an_output"])),
                await client.infer(DAG, feeds),   # the connection is still fine
            ]

    *failures, fine = asyncio.run(errors())
    codes = [f.code for f in failures]
    assert codes == [grpc.StatusCode.NOT_FOUND] + [grpc.StatusCode.INVALID_ARGUMENT] * 4, \
        [(f.code, f.details) for f in failures]
    assert "no model 'nope'" in failures[0].details
    for f in failures[1:4]:
        assert name in f.details or "input" in f.details, f.details
    assert "not_an_output" in failures[4].details
    check(fine, reference(plans["dag"], feeds))


def test_requested_outputs_only(dag_pipeline, plans):
    feeds = model_feeds(plans["dag"], seed=3)
    want = reference(plans["dag"], feeds)
    first = next(iter(want))

    async def one():
        async with LinkClient(dag_pipeline.entry, timeout=10) as client:
            return await client.infer(DAG, feeds, outputs=[first])

    answer = asyncio.run(one())
    assert list(answer) == [first]
    np.testing.assert_allclose(answer[first], want[first], rtol=1e-5, atol=1e-6)


def test_no_tensor_link_at_the_entry_falls_back_to_grpc(plans):
    pipeline = Pipeline(plans["mlp"], link="grpc")
    try:
        feeds = model_feeds(plans["mlp"])

        async def one():
            async with LinkClient(pipeline.entry, timeout=10) as client:
                return await client.infer("mlp", feeds), client.transport

        answer, transport = asyncio.run(one())
        assert transport == "grpc"
        check(answer, reference(plans["mlp"], feeds))
    finally:
        pipeline.close()


def test_stopped_downstream_tier_is_unavailable_naming_it_and_deadlines_hold(plans):
    pipeline = Pipeline(plans["mlp"])
    try:
        feeds = model_feeds(plans["mlp"])

        async def scenario():
            async with LinkClient(pipeline.entry, timeout=10) as client:
                check(await client.infer("mlp", feeds), reference(plans["mlp"], feeds))
                late = await failure(client.infer("mlp", feeds, timeout=1e-5))
                await asyncio.get_running_loop().run_in_executor(
                    None, pipeline.stop_tier, "cloud")
                down = await failure(client.infer("mlp", feeds))
                return late, down

        late, down = asyncio.run(scenario())
        assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED, late.details
        assert down.code == grpc.StatusCode.UNAVAILABLE, down.details
        assert "tier 'cloud'" in down.details
    finally:
        pipeline.close()


def test_entry_tier_down_is_unavailable(plans):
    pipeline = Pipeline(plans["mlp"])
    entry = pipeline.entry
    pipeline.close()

    async def scenario():
        async with LinkClient(entry, timeout=2) as client:
            return await failure(client.infer("mlp", model_feeds(plans["mlp"])))

    assert asyncio.run(scenario()).code == grpc.StatusCode.UNAVAILABLE
