"""Shared-memory lanes: large payloads between tiers on one host go through /dev/shm, the
socket carrying only where they lie; answers, slots and the /dev/shm names are handled
whatever the receiver does."""
from __future__ import annotations

import asyncio
import glob
import os
import random
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from .conftest import Pipeline, make_plan, reference
from .test_pipeline import model_feeds
from wpk.runtime.link_frames import (HEADER, LANE_REQUEST, REQUEST, Frame, FrameError, FrameReader,
                                     encode, send_parts)
from wpk.runtime.lane import LANE_MIN_BYTES, LANE_SLOTS, LaneReader, LaneWriter
from wpk.runtime.link_client import LinkClient
from wpk.runtime.link_server import LinkServer
from wpk.runtime.tensor_link import Expiry, LinkConnection


def lane_files() -> set[str]:
    return set(glob.glob("/dev/shm/wpk-lane-*"))


class Doubler:
    """A LinkServer answering each request with its tensors doubled, some late, from other
    threads: answers come back out of order while their payloads sit in lane slots."""

    def __init__(self, lanes: bool = True):
        self.rng = random.Random(0)
        self.server = LinkServer("127.0.0.1", 0, self.handle, lanes=lanes)
        self.lane_payloads = 0

    def handle(self, frame, reply):
        self.lane_payloads += frame.payload.base is not None and not frame.payload.flags.owndata
        values = {k: v * 2 for k, v in frame.arrays("echo").items()}
        threading.Timer(self.rng.uniform(0, 0.01), reply.ok, args=(values,)).start()


def burst(connection, loop, count: int):
    """`count` requests at once, each with a 200 KB tensor; their answers' first values."""

    async def one(i: int):
        future = loop.create_future()
        payload = {"big": np.full(50_000, i, np.float32), "small": np.array([i])}
        connection.send(lambda rid: encode(REQUEST, rid, payload, model="echo"), 10.0,
                        lambda o: loop.call_soon_threadsafe(future.set_result, o))
        outcome = await future
        assert not isinstance(outcome, Exception), outcome
        return float(outcome["big"][12_345]), int(outcome["small"][0])

    return asyncio.gather(*(one(i) for i in range(count)))


def test_large_payloads_go_through_the_lane_and_come_back_right():
    before = lane_files()
    doubler = Doubler()

    async def scenario():
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", doubler.server.port))
        connection = LinkConnection(sock, Expiry(), lanes=True)
        first = await burst(connection, loop, 1)      # inline: it opens the lane
        answers = [first, *[await burst(connection, loop, 4 * LANE_SLOTS)
                            for _ in range(3)]]        # more in flight than slots
        lane, ready = connection.lane, connection.lane.ready
        connection.close()
        return answers, lane, ready

    answers, lane, ready = asyncio.run(scenario())
    doubler.server.close()
    for batch in answers:
        assert batch == [(2.0 * i, 2 * i) for i in range(len(batch))]
    assert ready and 0 < lane.placed < 3 * 4 * LANE_SLOTS   # the extras went inline
    assert doubler.lane_payloads == lane.placed
    assert not lane.held and len(lane.free) == LANE_SLOTS          # every slot came back
    assert lane_files() <= before                                  # nothing left in /dev/shm


def test_a_receiver_that_maps_no_lanes_gets_every_payload_inline():
    before = lane_files()
    doubler = Doubler(lanes=False)

    async def scenario():
        loop = asyncio.get_running_loop()
        connection = LinkConnection(socket.create_connection(("127.0.0.1",
                                                              doubler.server.port)),
                                    Expiry(), lanes=True)
        answers = [await burst(connection, loop, 8) for _ in range(2)]
        lane = connection.lane
        connection.close()
        return answers, lane

    answers, lane = asyncio.run(scenario())
    doubler.server.close()
    assert answers[1] == [(2.0 * i, 2 * i) for i in range(8)]
    assert not lane.ready and lane.placed == 0 and doubler.lane_payloads == 0
    assert lane.mapping.closed   # the refused lane's pages went back at once
    assert lane_files() <= before


def test_a_slot_is_reused_only_once_its_request_is_answered():
    """A request that expired may still be read by the receiver: its slot waits for the
    answer, however late."""
    lane = LaneWriter(LANE_MIN_BYTES)
    try:
        lane.attached(True)
        parts = encode(REQUEST, 0, {"x": np.ones(LANE_MIN_BYTES // 4, np.float32)}, model="m")
        assert all(lane.place(rid, parts) is not None for rid in range(LANE_SLOTS))
        assert lane.place(LANE_SLOTS, parts) is None    # all held: inline
        lane.release(3)
        placed = lane.place(LANE_SLOTS + 1, parts)
        assert placed is not None and HEADER.unpack_from(placed[0])[1] == LANE_REQUEST
        small = encode(REQUEST, 0, {"x": np.ones(10, np.float32)}, model="m")
        lane.release(4)
        assert lane.place(LANE_SLOTS + 2, small) is None  # small payloads stay inline
    finally:
        lane.close()


def test_lane_frames_from_a_hostile_sender_are_refused():
    with pytest.raises(FrameError):
        LaneReader({"lane": "../../etc/passwd", "bytes": 4096})
    with pytest.raises(FileNotFoundError):
        LaneReader({"lane": "wpk-lane-0-deadbeef", "bytes": 4096, "slot": 4096})
    lane = LaneWriter(LANE_MIN_BYTES)
    try:
        reader = LaneReader(lane.open_meta())
        lane.attached(True)
        descriptor = [["x", "FP32", [LANE_MIN_BYTES], "raw", 0.0, LANE_MIN_BYTES * 4]]
        for offset in (lane.size - 16, 2**63):
            frame = Frame(LANE_REQUEST, 0, 1, -1.0, {"t": descriptor, "m": "m"},
                          np.frombuffer(offset.to_bytes(8, "little"), np.uint8))
            with pytest.raises(FrameError):
                reader.resolve(frame, 1 << 30)
        inside = Frame(LANE_REQUEST, 0, 1, -1.0, {"t": descriptor, "m": "m"},
                       np.frombuffer((4096).to_bytes(8, "little"), np.uint8))
        with pytest.raises(FrameError):   # not where a slot starts
            reader.resolve(inside, 1 << 30)
        small = [["x", "FP32", [1024], "raw", 0.0, 4096]]
        inside = Frame(LANE_REQUEST, 0, 1, -1.0, {"t": small, "m": "m"},
                       np.frombuffer((0).to_bytes(8, "little"), np.uint8))
        with pytest.raises(FrameError, match="over the limit"):   # the tier's own limit
            reader.resolve(inside, 1024)
        assert reader.resolve(inside, 4096).payload.nbytes == 4096
    finally:
        lane.close()
    # on a connection without a lane, a lane request drops that connection only
    server = LinkServer("127.0.0.1", 0, lambda frame, reply: reply.ok({}))
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        head = bytearray(encode(REQUEST, 1, {"x": np.ones(4, np.float32)}, model="m")[0])
        head[4] = LANE_REQUEST
        send_parts(sock, [head[:HEADER.size - 8] + (8).to_bytes(8, "little")
                          + head[HEADER.size:], (0).to_bytes(8, "little")])
        sock.settimeout(5)
        assert sock.recv(1) == b""     # closed
    finally:
        server.close()


def test_a_pipeline_with_large_cut_tensors_uses_lanes_and_matches_the_model(tmp_path):
    from wpk.examples import resnet_like

    before = lane_files()
    plan = make_plan(resnet_like(image_size=128, width=16, classes=10), tmp_path / "resnet128",
                     {"conv_12": "device", "relu_13": "edge", "add_17": "cloud"})
    pipeline = Pipeline(plan)
    try:
        client = triton.InferenceServerClient(pipeline.entry)
        for seed in range(6):
            feeds = model_feeds(plan, seed=seed)
            inputs = []
            for name, array in feeds.items():
                tensor = triton.InferInput(name, list(array.shape), "FP32")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            answer = client.infer("resnet_like", inputs)
            expected = reference(plan, feeds)
            for name, value in expected.items():
                np.testing.assert_allclose(answer.as_numpy(name), value, rtol=1e-5, atol=1e-6)
        lanes = [pipeline.services[t].link.connection.lane for t in ("device", "edge")]

        async def over_the_entry_link():   # the client's 196 KB input: a lane of its own
            async with LinkClient(pipeline.entry, timeout=30) as client:
                for seed in range(6):
                    feeds = model_feeds(plan, seed=seed)
                    answer = await client.infer("resnet_like", feeds)
                    for name, value in reference(plan, feeds).items():
                        np.testing.assert_allclose(answer[name], value, rtol=1e-5, atol=1e-6)
                return client._tcp_link.connection.lane, \
                    pipeline.services["device"].link.connection.lane

        client_lane, entry_lane = asyncio.run(over_the_entry_link())
    finally:
        pipeline.close()
    forwarded = [t.forward for t in pipeline.plan.tiers[:2]]
    assert all(lane is not None and lane.placed >= 5 for lane in lanes), forwarded
    assert client_lane is not None and client_lane.placed >= 5
    assert entry_lane is not None and entry_lane.placed >= 5
    assert lane_files() <= before
    assert os.path.isdir("/dev/shm")


def local_network_address() -> str | None:
    """An address of this host that is not loopback (None when it has none)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))   # no packet is sent: it only picks a route
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_only_connections_over_loopback_get_lanes():
    from wpk.runtime.lane import over_loopback

    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    try:
        with socket.create_connection(("127.0.0.1", port)) as local:
            assert over_loopback(local)
        address = local_network_address()
        if address is None:
            pytest.skip("this host has no address but loopback")
        with socket.create_connection((address, port)) as networked:
            assert not over_loopback(networked)
    finally:
        listener.close()


def test_the_receiver_maps_only_regular_lane_files_of_its_own_user(tmp_path):
    """No links followed (a link named like a lane would expose any readable file), no FIFO
    (it would block the connection's reader), nobody else's file."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 4096)
    names = []
    try:
        link = "/dev/shm/wpk-lane-1-aaaa"
        os.symlink(secret, link)
        names.append(link)
        fifo = "/dev/shm/wpk-lane-1-bbbb"
        os.mkfifo(fifo)
        names.append(fifo)
        for path in (link, fifo):
            with pytest.raises(OSError):
                LaneReader({"lane": os.path.basename(path), "bytes": 4096, "slot": 4096})
        if os.geteuid() == 0:
            foreign = "/dev/shm/wpk-lane-1-cccc"
            with open(foreign, "wb") as handle:
                handle.write(b"x" * 4096)
            names.append(foreign)
            os.chown(foreign, 65534, 65534)
            with pytest.raises(OSError, match="not a lane of this user"):
                LaneReader({"lane": "wpk-lane-1-cccc", "bytes": 4096, "slot": 4096})
    finally:
        for path in names:
            os.unlink(path)


def test_a_second_lane_on_one_connection_closes_it_and_senders_open_one_lane():
    from wpk.runtime.link_frames import LANE_OPEN, encode_meta

    server = LinkServer("127.0.0.1", 0, lambda frame, reply: reply.ok({}))
    lanes = [LaneWriter(LANE_MIN_BYTES), LaneWriter(LANE_MIN_BYTES)]
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.settimeout(5)
        send_parts(sock, encode_meta(LANE_OPEN, 1, lanes[0].open_meta()))
        answer = FrameReader(sock).read()
        assert answer.status == 0                          # mapped
        send_parts(sock, encode_meta(LANE_OPEN, 2, lanes[1].open_meta()))
        assert sock.recv(1) == b""                         # a second one: closed
    finally:
        for lane in lanes:
            lane.close()
        server.close()
    # a sender's threads racing to send its first large payloads open one lane
    connection = LinkConnection(socket.create_connection(("127.0.0.1", Doubler().server.port)),
                                Expiry(), lanes=True)
    opened, start = [], threading.Barrier(4)
    connection._open_lane = lambda payload: (opened.append(payload), time.sleep(0.05))
    parts = encode(REQUEST, 1, {"x": np.ones(LANE_MIN_BYTES, np.float32)}, model="m")
    threads = [threading.Thread(target=lambda: (start.wait(), connection._through_lane(1, parts)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    connection.close()
    assert len(opened) == 1


def test_lanes_are_for_loopback_peers_only():
    from wpk.runtime.link_frames import LANE_OPEN, encode_meta

    address = local_network_address()
    if address is None:
        pytest.skip("this host has no address but loopback")
    server = LinkServer("0.0.0.0", 0, lambda frame, reply: reply.ok({}))
    lane = LaneWriter(LANE_MIN_BYTES)
    try:
        sock = socket.create_connection((address, server.port))
        sock.settimeout(5)
        send_parts(sock, encode_meta(LANE_OPEN, 1, lane.open_meta()))
        answer = FrameReader(sock).read()
        assert answer.status == grpc.StatusCode.PERMISSION_DENIED.value[0]
        sock.close()
    finally:
        lane.close()
        server.close()


def test_names_left_by_a_sender_that_died_are_swept(monkeypatch):
    import subprocess
    import sys

    import wpk.runtime.lane as lane_module

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = f"/dev/shm/wpk-lane-{dead.pid:x}-0123abcd"
    alive = f"/dev/shm/wpk-lane-{os.getpid():x}-4567abcd"
    for path in (left, alive):
        with open(path, "wb") as handle:
            handle.write(b"x")
    monkeypatch.setattr(lane_module, "_swept", False)
    lane = LaneWriter(LANE_MIN_BYTES)
    lane.close()
    try:
        assert not os.path.exists(left) and os.path.exists(alive)
    finally:
        for path in (left, alive):
            if os.path.exists(path):
                os.unlink(path)
