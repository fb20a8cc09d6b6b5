"""The tensor link (tier -> next tier over TCP frames): wire format, multiplexing with answers
out of order, deadlines, a downstream that is down or hung, fallback to gRPC, TLS."""
from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from .conftest import Pipeline, fake_tier, reference
from .test_pipeline import expect_error, model_feeds, triton_infer
from wpk.runtime import protocol as pb
from wpk.runtime import tier_core
from wpk.runtime.client import InferenceClient
from wpk.runtime.codecs import Codec, Encoder
from wpk.runtime.link_frames import REQUEST, FrameReader, encode, send_parts
from wpk.runtime.status import TierError
from wpk.runtime.link_client import LinkClient
from wpk.runtime.link_server import LinkServer
from wpk.runtime.tensor_link import EXTENSION_PREFIX, Expiry, LinkConnection
from wpk.runtime.tensors import TensorError


def arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((2, 3, 40)).astype(np.float32),
            "ids": rng.integers(0, 1000, (7,), dtype=np.int64),
            "big": rng.standard_normal((300, 1000)).astype(np.float32)}   # 1.2 MB


@pytest.mark.parametrize("codec", ["raw", "fp16", "int8", "raw+zstd", "fp16+zstd", "int8+zstd"])
def test_frames_round_trip_every_codec_within_its_tolerance(codec):
    sent = arrays(1)
    sent["x"][0, 0, 0] = np.inf  # lossy codecs send non-finite tensors exactly
    encoder = Encoder(Codec.parse(codec)) if codec != "raw" else None
    left, right = socket.socketpair()
    with left, right:
        parts = encode(REQUEST, 42, sent, model="m.edge", timeout_ms=1500.0, encoder=encoder)
        writer = threading.Thread(target=send_parts, args=(left, parts))
        writer.start()
        frame = FrameReader(right, staging=4096).read()  # small staging: payload lands in place
        writer.join()
    assert (frame.kind, frame.request_id, frame.timeout_ms) == (REQUEST, 42, 1500.0)
    assert frame.meta["m"] == "m.edge"
    got = frame.arrays("m.edge")
    assert list(got) == list(sent)
    for name, want in sent.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
    np.testing.assert_array_equal(got["x"], sent["x"])  # holds inf: sent exactly
    big = sent["big"]
    assert np.all(np.abs(got["big"].astype(np.float64) - big) <= Codec.parse(codec)
                  .tolerance(big))
    np.testing.assert_array_equal(got["ids"], sent["ids"])


def test_bad_tensor_descriptions_are_named():
    left, right = socket.socketpair()
    with left, right:
        send_parts(left, encode(REQUEST, 1, {"x": np.zeros((2, 2), np.float32)}, model="m"))
        frame = FrameReader(right).read()
    from wpk.tensor_spec import TensorSpec
    with pytest.raises(TensorError, match=r"model 'm' input 'x': shape \[2,2\], expected \[3\]"):
        frame.arrays("m", {"x": TensorSpec.from_kserve("x", "FP32", (3,))})
    with pytest.raises(TensorError, match="missing input 'y'"):
        frame.arrays("m", {"x": TensorSpec.from_kserve("x", "FP32", (2, 2)),
                           "y": TensorSpec.from_kserve("y", "FP32", (1,))})
    # codec parameters a client got wrong: TensorError (INVALID_ARGUMENT), not INTERNAL
    for codec, scale, message in (("raw+zstd", 0, "not a zstd frame"),
                                  ("int8", "half", "wpk_scale must be a finite number")):
        frame.meta["t"] = [["x", "FP32", [2, 2], codec, scale, 16]]
        with pytest.raises(TensorError, match=f"model 'm' input 'x': .*{message}"):
            frame.arrays("m", {"x": TensorSpec.from_kserve("x", "FP32", (2, 2))})


class Shuffler:
    """A LinkServer that answers each request with its tensors doubled, after a random delay,
    from a thread of its own: answers come back in another order than requests went out."""

    def __init__(self):
        self.rng = random.Random(0)
        self.server = LinkServer("127.0.0.1", 0, self.handle)

    def handle(self, frame, reply):
        delay = self.rng.uniform(0, 0.02)
        values = {k: v * 2 for k, v in frame.arrays("echo").items()}
        threading.Timer(delay, reply.ok, args=(values,)).start()


def test_many_requests_in_flight_answers_out_of_order_thread_connection():
    shuffler = Shuffler()
    connection = LinkConnection(socket.create_connection(("127.0.0.1", shuffler.server.port)),
                                Expiry())
    outcomes: dict[int, object] = {}
    finished = threading.Semaphore(0)
    order: list[int] = []

    def send(i: int) -> None:
        payload = {"x": np.full((3, 5), i, np.float32), "big": np.full(50_000, i, np.int64)}

        def done(outcome, i=i):
            outcomes[i] = outcome
            order.append(i)
            finished.release()
        connection.send(lambda rid: encode(REQUEST, rid, payload, model="echo"), 5.0, done)

    senders = [threading.Thread(target=lambda k=k: [send(i) for i in range(k, 200, 4)])
               for k in range(4)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join()
    for _ in range(200):
        assert finished.acquire(timeout=10)
    connection.close()
    shuffler.server.close()
    assert order != sorted(order)           # answers did come back out of order
    for i, outcome in outcomes.items():     # and each one reached its own request
        assert float(outcome["x"][0, 0]) == 2 * i and int(outcome["big"][-1]) == 2 * i


def test_a_late_answer_gives_deadline_exceeded_and_the_connection_goes_on():
    release = threading.Event()

    def handle(frame, reply):
        if frame.meta["m"] == "slow":
            threading.Thread(target=lambda: (release.wait(5), reply.ok({}))).start()
        else:
            reply.ok(frame.arrays("echo"))

    server = LinkServer("127.0.0.1", 0, handle)

    async def scenario():
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", server.port))
        connection = LinkConnection(sock, Expiry())

        async def call(model: str, timeout: float):
            future = loop.create_future()
            connection.send(lambda rid: encode(REQUEST, rid, {"a": np.ones(3)}, model=model),
                            timeout, lambda o: loop.call_soon_threadsafe(future.set_result, o))
            return await future

        started = time.monotonic()
        late = await call("slow", 0.2)
        waited = time.monotonic() - started
        release.set()
        fine = await call("fast", 5.0)
        connection.close()
        return late, waited, fine

    late, waited, fine = asyncio.run(scenario())
    server.close()
    assert isinstance(late, TierError) and late.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.15 < waited < 2.0
    np.testing.assert_array_equal(fine["a"], np.ones(3))


def test_pipeline_on_the_tensor_link_many_concurrent_requests(plans):
    """The default link is the tensor link, on both hops; 48 requests in flight at once
    each get their own answer."""
    pipeline = Pipeline(plans["dag"])
    try:
        for tier in ("edge", "cloud"):
            with grpc.insecure_channel(pipeline.address[tier]) as channel:
                extensions = pb.Stub(channel).ServerMetadata(pb.ServerMetadataRequest()).extensions
            assert [e for e in extensions if e.startswith(EXTENSION_PREFIX)], extensions
        feeds = [model_feeds(plans["dag"], seed=100 + i) for i in range(48)]

        async def run_all():
            async with InferenceClient(pipeline.entry, timeout=30) as client:
                return await asyncio.gather(*(client.infer(pipeline.plan.name, f) for f in feeds))

        answers = asyncio.run(run_all())
        import onnxruntime as ort
        session = ort.InferenceSession(pipeline.plan.model.file,
                                       providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        for feed, answer in zip(feeds, answers):   # each answer is its own request's
            for name, want in zip(names, session.run(names, feed)):
                np.testing.assert_allclose(answer[name], want, rtol=1e-4, atol=1e-5)
        for tier in ("device", "edge"):
            link = pipeline.services[tier].link
            assert link.kind == "tcp" and link.connection is not None
            assert link.connection.error is None
    finally:
        pipeline.close()


def test_a_tier_without_tensor_link_is_reached_over_grpc(plans):
    """The cloud tier behind another KServe server (nothing advertised): the edge falls back
    to ModelInfer calls; device -> edge stays on the tensor link."""
    pipeline = Pipeline(plans["mlp"], grpc_only=("cloud",))
    try:
        feeds = model_feeds(plans["mlp"])
        want = reference(plans["mlp"], feeds)["softmax_16_out"]
        for _ in range(3):
            np.testing.assert_allclose(triton_infer(pipeline.entry, "mlp", feeds)
                                       .as_numpy("softmax_16_out"), want, rtol=1e-5, atol=1e-6)
        assert pipeline.services["device"].link.connection is not None   # device -> edge: tcp
        edge_link = pipeline.services["edge"].link
        assert edge_link.kind == "tcp" and edge_link.connection is None  # edge -> cloud: grpc
        assert edge_link.fallback_until > 0
    finally:
        pipeline.close()


def test_link_grpc_names_a_removed_transport_and_means_the_tensor_link(plans):
    """`--link grpc` (gRPC streams between tiers, removed): one warning, then the tensor link."""
    with pytest.warns(UserWarning, match=r"--link grpc: gRPC streams between tiers were "
                                         r"removed; using the tensor link"):
        pipeline = Pipeline(plans["mlp"], link={"device": "grpc"})
    try:
        feeds = model_feeds(plans["mlp"])
        triton_infer(pipeline.entry, "mlp", feeds)
        assert all(s.link_kind == "tcp" for s in pipeline.services.values())
        assert pipeline.services["device"].link.connection is not None
        assert pipeline.link_servers["device"] is not None
    finally:
        pipeline.close()


class HungLinkPeer:
    """A next tier that advertises a tensor link and never answers on it."""

    def __init__(self):
        self.link = LinkServer("127.0.0.1", 0, lambda frame, reply: None)
        port = self.link.port

        class Peer:
            def ServerMetadata(self, request, context):
                return pb.ServerMetadataResponse(name="hung",
                                                 extensions=[f"{EXTENSION_PREFIX}{port}"])

            def __getattr__(self, method):
                return lambda request, context: pb.METHODS[method][1]()

        self.server, self.address = fake_tier(Peer())

    def close(self):
        self.server.stop(0)
        self.link.close()


def test_hung_tensor_link_gives_deadline_exceeded_naming_the_tier(plans, monkeypatch):
    monkeypatch.setattr(tier_core, "DEADLINE_MARGIN_S", 0.3)   # room on a loaded machine
    peer = HungLinkPeer()
    pipeline = Pipeline(plans["resnet"], hop_timeout=1.0, next_override={"device": peer.address})
    try:
        feeds = model_feeds(plans["resnet"])
        message = expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, "tier 'edge' at " + peer.address,
                               triton_infer, pipeline.entry, "resnet_like", feeds,
                               client_timeout=2.0)
        assert "deadline exceeded waiting for" in message
        started = time.monotonic()
        expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, "tier 'edge'", triton_infer,
                     pipeline.entry, "resnet_like", feeds)   # no deadline: --hop-timeout
        assert time.monotonic() - started < 5
        assert pipeline.services["device"].link.connection is not None  # it was the tcp link
        assert triton.InferenceServerClient(pipeline.entry).is_server_live()
    finally:
        pipeline.close()
        peer.close()


def test_large_frames_to_a_next_tier_that_stops_reading_do_not_hold_up_the_loop(tmp_path):
    """The entry tier's gRPC handlers forward from its event loop: a frame the socket cannot
    take (a large payload, no lane: a network's pace, here a peer that never reads) leaves
    from a worker thread, so the loop still answers (health, other requests) meanwhile."""
    from wpk.examples import resnet_like
    from .conftest import make_plan

    plan = make_plan(resnet_like(image_size=128, width=16, classes=10), tmp_path / "r128",
                     {"conv_12": "device", "relu_13": "edge", "add_17": "cloud"})
    mute = socket.create_server(("127.0.0.1", 0))   # accepts, never reads a byte

    class Peer:
        def ServerMetadata(self, request, context):   # a tensor link, no lanes
            return pb.ServerMetadataResponse(
                name="mute", extensions=[f"{EXTENSION_PREFIX}{mute.getsockname()[1]}"])

        def __getattr__(self, method):
            return lambda request, context: pb.METHODS[method][1]()

    server, address = fake_tier(Peer())
    pipeline = Pipeline(plan, hop_timeout=4.0, next_override={"device": address})
    feeds = model_feeds(plan)
    count = -(-(32 << 20) // pipeline.plan.links[0].bytes)   # more than socket buffers hold
    callers = [threading.Thread(target=lambda: pytest.raises(
        Exception, triton_infer, pipeline.entry, "resnet_like", feeds, client_timeout=5))
        for _ in range(count)]
    try:
        for caller in callers:
            caller.start()
        time.sleep(1.0)
        live = triton.InferenceServerClient(pipeline.entry)
        for _ in range(5):
            started = time.monotonic()
            assert live.is_server_live(client_timeout=2)
            assert time.monotonic() - started < 0.5
            time.sleep(0.1)
    finally:
        for caller in callers:
            caller.join(15)
        pipeline.close()
        server.stop(0)
        mute.close()


def test_stopped_downstream_on_the_tensor_link_is_unavailable_at_once(plans):
    """The next tier stops: UNAVAILABLE naming it, at once (a restarted tier is found
    again: tests/runtime/test_restart.py)."""
    pipeline = Pipeline(plans["mlp"])
    feeds = model_feeds(plans["mlp"])
    try:
        triton_infer(pipeline.entry, "mlp", feeds)
        edge_address = pipeline.address["edge"]
        pipeline.stop_tier("edge")
        started = time.monotonic()
        expect_error(grpc.StatusCode.UNAVAILABLE, f"tier 'edge' at {edge_address} is "
                     "unavailable", triton_infer, pipeline.entry, "mlp", feeds,
                     client_timeout=10)
        assert time.monotonic() - started < 5
    finally:
        pipeline.close()


def test_tls_tiers_use_the_grpc_link(plans, tmp_path):
    from wpk.deploy.tls import generate
    from wpk.runtime import tls

    pki = generate(tmp_path / "pki", ["device", "edge", "cloud", "client"])
    pipeline = Pipeline(plans["mlp"], tls_dir=pki)
    try:
        assert all(s.link_kind == "grpc" for s in pipeline.services.values())
        assert all(s is None for s in pipeline.link_servers.values())
        feeds = model_feeds(plans["mlp"])
        creds = tls.channel_credentials(tls.load(pki, "client"))

        async def call():
            async with InferenceClient(pipeline.entry, credentials=creds,
                                       server_name="device", timeout=10) as client, \
                    LinkClient(pipeline.entry, credentials=creds, server_name="device",
                               timeout=10) as link_client:   # no tensor link: ModelInfer
                return (await client.infer("mlp", feeds), await link_client.infer("mlp", feeds),
                        link_client.transport)

        over_grpc, over_link_client, transport = asyncio.run(call())
        want = reference(plans["mlp"], feeds)["softmax_16_out"]
        for answer in (over_grpc, over_link_client):
            np.testing.assert_allclose(answer["softmax_16_out"], want, rtol=1e-5, atol=1e-6)
        assert transport == "grpc"
    finally:
        pipeline.close()


def test_garbage_on_the_tensor_link_port_drops_that_connection_only(plans):
    pipeline = Pipeline(plans["mlp"])
    try:
        port = pipeline.link_servers["edge"].port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as intruder:
            intruder.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
            assert intruder.recv(100) == b""        # closed on the intruder
        feeds = model_feeds(plans["mlp"])
        np.testing.assert_allclose(triton_infer(pipeline.entry, "mlp", feeds)
                                   .as_numpy("softmax_16_out"),
                                   reference(plans["mlp"], feeds)["softmax_16_out"],
                                   rtol=1e-5, atol=1e-6)
    finally:
        pipeline.close()


def test_an_unreachable_tensor_link_port_falls_back_to_grpc(plans):
    """The next tier is reached through a relay that forwards its gRPC port only (as
    wpk-emulate's relays and a Kubernetes Service do): its advertised tensor-link port is
    not reachable at that address, so the link uses gRPC through the relay."""
    import subprocess
    import sys

    behind = Pipeline(plans["mlp"])
    relay = subprocess.Popen([sys.executable, "-m", "wpk.deploy.delay_relay", "--listen",
                              "127.0.0.2:0", "--to", behind.address["edge"], "--delay-ms", "0"],
                             stdout=subprocess.PIPE, text=True)
    front = None
    try:
        relayed = relay.stdout.readline().split()[1]
        front = Pipeline(plans["mlp"], next_override={"device": relayed})
        feeds = model_feeds(plans["mlp"])
        np.testing.assert_allclose(triton_infer(front.entry, "mlp", feeds)
                                   .as_numpy("softmax_16_out"),
                                   reference(plans["mlp"], feeds)["softmax_16_out"],
                                   rtol=1e-5, atol=1e-6)
        link = front.services["device"].link
        assert link.kind == "tcp" and link.connection is None and link.fallback_until > 0
        assert link.port == behind.link_servers["edge"].port   # it was advertised
    finally:
        relay.kill()
        relay.wait()
        if front is not None:
            front.close()
        behind.close()
