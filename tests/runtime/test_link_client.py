"""LinkClient: clients entering the pipeline over the entry tier's tensor link (real tier
servers on 127.0.0.1, real ONNX Runtime sessions)."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from .conftest import Pipeline, reference
from .test_pipeline import model_feeds
from wpk.runtime import protocol as pb
from wpk.runtime.client import InferenceClient
from wpk.runtime.status import TierError
from wpk.runtime.link_client import LinkClient
from wpk.runtime.tensor_link import EXTENSION_PREFIX


DAG = "random_dag_40"   # the plan's model name (the ONNX file's stem)


def check(answer: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(answer) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(answer[name], value, rtol=1e-5, atol=1e-6)


async def failure(call) -> TierError:
    with pytest.raises(TierError) as info:
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

    port = dag_pipeline.link_servers["device"].port
    assert f"{EXTENSION_PREFIX}{port}" in asyncio.run(extensions())


def test_many_requests_over_the_entry_link_match_the_whole_model(dag_pipeline, plans):
    """48 requests in flight at once over the tensor link, interleaved with gRPC requests:
    each gets its own answer (the dag has model outputs on every tier). The entry tier
    forwards both on its one connection to the next tier."""
    feeds = [model_feeds(plans["dag"], seed=200 + i) for i in range(48)]

    async def run_all():
        async with LinkClient(dag_pipeline.entry, timeout=30) as client, \
                InferenceClient(dag_pipeline.entry, timeout=30) as grpc_client:
            calls = [(client if i % 3 else grpc_client).infer(DAG, f)
                     for i, f in enumerate(feeds)]
            return await asyncio.gather(*calls), client.transport

    answers, transport = asyncio.run(run_all())
    assert transport == "tcp"
    for feed, answer in zip(feeds, answers):
        want = reference(plans["dag"], feed)
        check(answer, want)
        assert list(answer) == list(want)     # the model's output order, as over gRPC
    assert dag_pipeline.services["device"].link.connection.error is None


def test_a_slice_model_answers_as_over_grpc(dag_pipeline, plans):
    """`dag.edge` over the link at the edge tier: its slice's outputs, as ModelInfer gives;
    with pipeline=True the edge's slice and the cloud's, as `wpk_pipeline` gives."""
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
        model = f"{DAG}.edge"
        async with LinkClient(dag_pipeline.address["edge"], timeout=30) as client, \
                InferenceClient(dag_pipeline.address["edge"], timeout=30) as grpc_client:
            return ((await client.infer(model, inputs), await grpc_client.infer(model, inputs)),
                    (await client.infer(model, inputs, pipeline=True),
                     await grpc_client.infer(model, inputs,
                                             parameters={"wpk_pipeline": True})))

    (slice_link, slice_grpc), (rest_link, rest_grpc) = asyncio.run(both())
    check(slice_link, slice_grpc)
    assert list(slice_link) == list(slice_grpc)     # the same outputs, in the same order
    check(rest_link, rest_grpc)
    assert set(rest_link) != set(slice_link)


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
    """Another KServe server in front of the entry tier: ModelInfer calls."""
    from .conftest import GrpcOnly

    pipeline = Pipeline(plans["mlp"])
    front = GrpcOnly(pipeline.entry)
    try:
        feeds = model_feeds(plans["mlp"])

        async def one():
            async with LinkClient(front.address, timeout=10) as client:
                return await client.infer("mlp", feeds), client.transport

        answer, transport = asyncio.run(one())
        assert transport == "grpc"
        check(answer, reference(plans["mlp"], feeds))
    finally:
        front.close()
        pipeline.close()


def test_stream_true_names_a_removed_transport_and_means_the_tensor_link(dag_pipeline, plans):
    """InferenceClient(stream=True) (gRPC streams, removed from the client): one warning,
    then the tensor link; a request with parameters or an id goes as a ModelInfer call, which
    carries them (a slice model run as a pipeline, as `wpk_pipeline` says)."""
    feeds = model_feeds(plans["dag"], seed=5)

    async def calls():
        with pytest.warns(UserWarning, match=r"stream=True\): gRPC streams were removed"):
            client = InferenceClient(dag_pipeline.entry, stream=True, timeout=10)
        async with client:
            answer = await client.infer(DAG, feeds)
            transport = client.transport
            slice_name = f"{DAG}.device"
            alone = await client.infer(slice_name, feeds)
            whole = await client.infer(slice_name, feeds, parameters={"wpk_pipeline": True},
                                       request_id="7")
            return answer, transport, alone, whole

    answer, transport, alone, whole = asyncio.run(calls())
    assert transport == "tcp"
    check(answer, reference(plans["dag"], feeds))
    assert set(whole) != set(alone)     # the parameter reached the tier: the pipeline ran


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


def test_a_client_that_stops_reading_holds_up_only_itself(tmp_path, monkeypatch):
    """A caller floods the entry tier's link with requests for 200 KB answers and reads
    none. Answers to everyone else come from the same threads (the next tier's reader):
    they must not wait behind it. Its own connection ends once its answers stall."""
    from wpk.examples import mlp
    from wpk.runtime import link_server
    from wpk.runtime.link_frames import REQUEST, encode, send_parts

    from .conftest import make_plan

    monkeypatch.setattr(link_server, "ANSWER_SEND_TIMEOUT_S", 4.0)
    plan = make_plan(mlp(features=256, hidden=(128, 64, 32), classes=50000), tmp_path / "wide",
                     {"relu_4": "device", "gemm_7": "edge", "relu_8": "edge",
                      "gemm_11": "cloud"})
    pipeline = Pipeline(plan)
    mute = socket.socket()
    try:
        feeds = model_feeds(plan)
        want = reference(plan, feeds)
        server = pipeline.link_servers["device"]
        mute.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        mute.connect(("127.0.0.1", server.port))
        mute_address = "%s:%s" % mute.getsockname()[:2]

        def flood():
            try:
                for i in range(400):
                    send_parts(mute, encode(REQUEST, i + 1, feeds, model="mlp"))
            except OSError:
                pass   # its connection was ended: what the test waits for

        threading.Thread(target=flood, daemon=True).start()
        time.sleep(0.3)

        async def others():
            async with LinkClient(pipeline.entry, timeout=20) as link_client, \
                    InferenceClient(pipeline.entry, timeout=20) as grpc_client:
                slowest = 0.0
                for _ in range(30):
                    for client in (link_client, grpc_client):
                        started = time.monotonic()
                        check(await client.infer("mlp", feeds), want)
                        slowest = max(slowest, time.monotonic() - started)
                return slowest

        assert asyncio.run(others()) < 3.0   # held up, one would wait out the 4 s
        deadline = time.monotonic() + 20
        while any(c.peer == mute_address for c in list(server.connections)) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(c.peer == mute_address for c in server.connections)
    finally:
        mute.close()
        pipeline.close()


def test_requests_waiting_for_a_slow_connect_keep_their_own_deadline():
    """ServerMetadata hangs: four requests at once each fail at their own deadline, not one
    after another (each waiting for the previous one's attempt)."""
    from .conftest import fake_tier

    class Slow:
        def ServerMetadata(self, request, context):
            time.sleep(5)
            return pb.ServerMetadataResponse(name="slow")

        def __getattr__(self, method):
            return lambda request, context: pb.METHODS[method][1]()

    server, address = fake_tier(Slow(), workers=8)
    try:
        async def four():
            async with LinkClient(address, timeout=1.0) as client:
                started = time.monotonic()
                failures = await asyncio.gather(*(
                    failure(client.infer("m", {"x": np.zeros(4, np.float32)}))
                    for _ in range(4)))
                return failures, time.monotonic() - started

        failures, elapsed = asyncio.run(four())
        assert [f.code for f in failures] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 4
        assert elapsed < 3.5, elapsed   # one after another would take 4 s
    finally:
        server.stop(0)


def test_a_failed_dial_falls_back_to_grpc_and_the_recheck_dials_again(plans):
    """The entry tier's dial fails (gRPC for a while); once the retry time has come, a
    recheck dials again and requests go back to the tensor link."""
    pipeline = Pipeline(plans["mlp"])
    try:
        feeds = model_feeds(plans["mlp"])
        link = pipeline.services["device"].link

        async def scenario():
            async with LinkClient(pipeline.entry, timeout=10) as client:
                real_dial, failures = link._dial, [None, None]

                async def dial(port, timeout):               # two dials time out
                    if failures:
                        failures.pop()
                        return None
                    return await real_dial(port, timeout)

                link._dial = dial
                await client.infer("mlp", feeds)             # over gRPC: the dial failed
                assert link.fallback_until and link.connection is None
                link.fallback_until = time.monotonic() - 1   # as if 30 s had passed
                await client.infer("mlp", feeds)             # starts the recheck
                deadline = time.monotonic() + 15
                while link.connection is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await client.infer("mlp", feeds)
                return client.transport

        transport = asyncio.run(scenario())
        assert link.connection is not None and link.connection.error is None
        assert not link.fallback_until and transport == "tcp"
    finally:
        pipeline.close()


def test_refused_tensor_link_connections_fall_back_to_grpc(plans, monkeypatch):
    """Every tier refuses tensor-link connections (all MAX_CONNECTIONS taken): requests,
    the first ones included, are answered over gRPC instead of failing."""
    from wpk.runtime import link_server

    monkeypatch.setattr(link_server, "MAX_CONNECTIONS", 0)
    pipeline = Pipeline(plans["mlp"])
    try:
        feeds = model_feeds(plans["mlp"])
        want = reference(plans["mlp"], feeds)

        async def requests():
            async with LinkClient(pipeline.entry, timeout=10) as client, \
                    InferenceClient(pipeline.entry, timeout=10) as grpc_client:
                answers = await asyncio.gather(*(client.infer("mlp", feeds) for _ in range(4)),
                                               grpc_client.infer("mlp", feeds))
                return answers, client.transport

        answers, transport = asyncio.run(requests())
        for answer in answers:
            check(answer, want)
        assert transport == "grpc"
        assert pipeline.services["device"].link.fallback_until > 0   # device -> edge too
        assert all(pipeline.link_servers[t].refused > 0 for t in ("device", "edge"))
    finally:
        pipeline.close()


def test_a_stale_tensor_link_port_taken_by_another_process_is_asked_again(plans):
    """The entry tier restarted on another tensor-link port and a process that is no tier
    took the old one (it accepts, then closes): the client's request is answered over gRPC,
    and the next one asks for the port again and is back on the tensor link, instead of
    staying on gRPC for FALLBACK_RETRY_S."""
    pipeline = Pipeline(plans["mlp"])
    squatter = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept_and_close() -> None:
        while True:
            try:
                connection, _ = squatter.accept()
            except OSError:
                return
            accepted.append(connection)
            connection.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    try:
        feeds = model_feeds(plans["mlp"])
        want = reference(plans["mlp"], feeds)

        async def scenario():
            async with LinkClient(pipeline.entry, timeout=10) as client:
                check(await client.infer("mlp", feeds), want)
                assert client.transport == "tcp"
                link = client._tcp_link
                link.connection.close()              # as if the entry tier restarted ...
                link.connection = None
                link.port = squatter.getsockname()[1]    # ... and its old port was taken
                check(await client.infer("mlp", feeds), want)   # resent over gRPC
                after_squatter = client.transport, link.fallback_until
                check(await client.infer("mlp", feeds), want)
                return after_squatter, client.transport, link.port

        (transport, fallback_until), final, port = asyncio.run(scenario())
        assert accepted, "the client never dialled the old port"
        assert transport == "grpc" and fallback_until == 0.0
        assert final == "tcp" and port == pipeline.link_servers["device"].port
    finally:
        squatter.close()
        pipeline.close()


def test_a_refusal_on_the_remembered_port_falls_back_and_keeps_the_port(plans, monkeypatch):
    """The tier behind the remembered port refuses a new connection (all its connections
    taken): that is the right port, so the caller goes to gRPC for a while and keeps it,
    rather than asking for it again on every request."""
    from wpk.runtime import link_server

    pipeline = Pipeline(plans["mlp"])
    try:
        feeds = model_feeds(plans["mlp"])
        want = reference(plans["mlp"], feeds)

        async def scenario():
            async with LinkClient(pipeline.entry, timeout=10) as client:
                check(await client.infer("mlp", feeds), want)
                link = client._tcp_link
                port = link.port
                monkeypatch.setattr(link_server, "MAX_CONNECTIONS", 0)
                link.connection.close()
                link.connection = None
                check(await client.infer("mlp", feeds), want)   # refused, resent over gRPC
                return client.transport, link.fallback_until, link.port, port

        transport, fallback_until, port, remembered = asyncio.run(scenario())
        assert transport == "grpc" and fallback_until > 0 and port == remembered
        assert pipeline.link_servers["device"].refused > 0
    finally:
        pipeline.close()
