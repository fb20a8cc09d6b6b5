"""The tensor link and shared memory against hostile or garbled input and awkward timing:
frames that declare huge or negative sizes, answers that are not tensors or not answers,
callbacks that raise, a deadline that fires while its request is being sent, shared-memory
keys that leave /dev/shm, outputs for a region unregistered mid-request."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from wpk.runtime import protocol as pb
from wpk.runtime.link_frames import (ANSWER, HEADER, MAGIC, REQUEST, FrameError, FrameReader,
                                     encode, send_parts)
from wpk.runtime.status import TierError
from wpk.runtime.shared_memory import SharedMemoryRegistry
from wpk.runtime.link_server import LinkServer
from wpk.runtime.tensor_link import Expiry, LinkConnection
from wpk.runtime.tensors import TensorError


def raw_frame(kind: int, request_id: int, meta: dict, payload_len: int) -> bytes:
    meta_bytes = json.dumps(meta).encode()
    return HEADER.pack(MAGIC, kind, 0, 0, len(meta_bytes), request_id, -1.0,
                       payload_len) + meta_bytes


def test_a_frame_declaring_a_huge_payload_is_refused_before_any_allocation():
    left, right = socket.socketpair()
    with left, right:
        left.sendall(raw_frame(REQUEST, 1, {"m": "m", "t": [["x", "UINT8", [1 << 40], "raw", 0,
                                                             1 << 40]]}, 1 << 40))
        with pytest.raises(FrameError, match="over the limit"):
            FrameReader(right).read()


def test_negative_tensor_sizes_in_a_frame_are_refused():
    left, right = socket.socketpair()
    with left, right:
        left.sendall(raw_frame(REQUEST, 1, {"m": "m", "t": [["a", "FP32", [2], "raw", 0, -8],
                                                            ["b", "FP32", [2], "raw", 0, 8]]},
                               0))
        with pytest.raises(FrameError, match="negative"):
            FrameReader(right).read()


def test_a_hostile_frame_on_a_link_server_is_logged_and_closes_that_connection(capfd):
    server = LinkServer("127.0.0.1", 0, lambda frame, reply: reply.ok(frame.arrays("echo")),
                        where="tier 'edge'")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as intruder:
            intruder.sendall(raw_frame(REQUEST, 1, {"m": "m", "t": [["x", "UINT8", [1 << 40],
                                                                     "raw", 0, 1 << 40]]},
                                       1 << 40))
            assert intruder.recv(100) == b""   # closed on the intruder
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as honest:
            send_parts(honest, encode(REQUEST, 7, {"a": np.arange(3.0)}, model="echo"))
            answer = FrameReader(honest).read()
        np.testing.assert_array_equal(answer.arrays("a")["a"], np.arange(3.0))
    finally:
        server.close()
    err = capfd.readouterr().err
    assert "tier 'edge': tensor link from 127.0.0.1:" in err and "over the limit" in err
    assert "Traceback" not in err


class FakeTier:
    """A downstream that answers the requests of one connection with `answers(frame)`:
    a list of raw byte strings to send back."""

    def __init__(self, answers):
        self.answers = answers
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        sock, _ = self.listener.accept()
        with sock:
            reader = FrameReader(sock)
            try:
                while True:
                    frame = reader.read()
                    for data in self.answers(frame):
                        sock.sendall(data)
            except (EOFError, OSError):
                pass

    def close(self):
        self.listener.close()


def frame_bytes(parts) -> bytes:
    return b"".join(bytes(memoryview(p)) for p in parts)


def run_requests(port: int, count: int, timeout: float = 5.0, done_hook=None) -> list:
    """Send `count` requests over a connection; their outcomes in order (None: no outcome
    within 3 s, i.e. the request hangs)."""

    async def scenario():
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", port))
        connection = LinkConnection(sock, Expiry())
        outcomes = []
        for i in range(count):
            future = loop.create_future()
            calls = []

            def done(outcome, future=future, calls=calls, i=i):
                calls.append(outcome)
                loop.call_soon_threadsafe(future.set_result, outcome) if len(calls) == 1 \
                    else None
                if done_hook is not None:
                    done_hook(i)
            connection.send(lambda rid, i=i: encode(REQUEST, rid, {"a": np.full(3, i, float)},
                                                    model="m"), timeout, done)
            try:
                outcomes.append(await asyncio.wait_for(future, 3.0))
            except asyncio.TimeoutError:
                outcomes.append(None)
            await asyncio.sleep(0.05)
            assert len(calls) <= 1, "a request's callback ran more than once"
        connection.close()
        return outcomes

    return asyncio.run(scenario())


def test_an_answer_whose_descriptors_are_not_tensors_fails_only_its_request():
    def answers(frame):
        if frame.request_id == 1:   # valid JSON, sizes add up, but the shape is no shape
            return [raw_frame(ANSWER, 1, {"t": [["a", "FP64", "xy", "raw", 0, 0]]}, 0)]
        return [frame_bytes(encode(ANSWER, frame.request_id, frame.arrays("m")))]

    tier = FakeTier(answers)
    try:
        first, second = run_requests(tier.port, 2)
    finally:
        tier.close()
    assert isinstance(first, TierError) and first.code == grpc.StatusCode.INTERNAL
    assert "bad answer" in first.details
    np.testing.assert_array_equal(second["a"], np.full(3, 1.0))


def test_a_request_frame_coming_back_fails_the_pending_request_once():
    tier = FakeTier(lambda frame: [raw_frame(REQUEST, frame.request_id, {"m": "x", "t": []},
                                             0)])
    try:
        first, second = run_requests(tier.port, 2)
    finally:
        tier.close()
    assert isinstance(first, TierError) and first.code == grpc.StatusCode.UNAVAILABLE
    assert "request frame sent to a client" in first.details
    assert isinstance(second, TierError) and second.code == grpc.StatusCode.UNAVAILABLE


def test_a_callback_that_raises_does_not_stop_the_other_answers(capfd):
    tier = FakeTier(lambda frame: [frame_bytes(encode(ANSWER, frame.request_id,
                                                      frame.arrays("m")))])

    def hook(i):
        if i == 0:
            raise RuntimeError("caller's loop is closed")

    try:
        first, second = run_requests(tier.port, 2, done_hook=hook)
    finally:
        tier.close()
    np.testing.assert_array_equal(first["a"], np.zeros(3))
    np.testing.assert_array_equal(second["a"], np.ones(3))
    assert "caller's loop is closed" in capfd.readouterr().err


class EagerExpiry(Expiry):
    """An expiry thread that wins every race: a deadline already passed is taken off the heap
    and fired inside add(), before add() returns to the sender."""

    def add(self, deadline, connection, request_id):
        entry = super().add(deadline, connection, request_id)
        if deadline <= time.monotonic():
            entry[4] = False          # what the thread does when it pops the entry
            connection.expire(request_id)
        return entry


def test_a_deadline_that_fires_while_its_request_is_sent_still_fails_it():
    server = LinkServer("127.0.0.1", 0, lambda frame, reply: None)   # never answers
    outcomes = []
    finished = threading.Event()
    connection = LinkConnection(socket.create_connection(("127.0.0.1", server.port)),
                                EagerExpiry())
    try:
        connection.send(lambda rid: encode(REQUEST, rid, {"a": np.ones(2)}, model="m"), 0.0,
                        lambda outcome: (outcomes.append(outcome), finished.set()))
        assert finished.wait(3.0), "the request never got an outcome"
    finally:
        connection.close()
        server.close()
    assert len(outcomes) == 1 and outcomes[0].code == grpc.StatusCode.DEADLINE_EXCEEDED


# -- shared memory --------------------------------------------------------------------------
def test_a_shared_memory_key_that_is_a_symlink_out_of_dev_shm_is_refused(tmp_path):
    target = tmp_path / "precious.bin"
    target.write_bytes(bytes(4096))
    link = f"wpk_test_link_{os.getpid()}"
    os.symlink(target, f"/dev/shm/{link}")
    registry = SharedMemoryRegistry("tier 'test'")
    try:
        with pytest.raises(TierError) as info:
            registry.register("r", f"/{link}", 0, 4096)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "tier 'test'" in info.value.details and link in info.value.details
        with pytest.raises(TierError, match="not a POSIX shared memory name"):
            registry.register("r", "/bad\0name", 0, 16)
        assert not registry.regions
    finally:
        registry.close()
        os.unlink(f"/dev/shm/{link}")


def test_an_output_for_a_region_unregistered_mid_request_is_a_clear_error():
    from multiprocessing import shared_memory

    memory = shared_memory.SharedMemory(create=True, size=4096)
    registry = SharedMemoryRegistry("tier 'test'")
    try:
        registry.register("out", f"/{memory.name}", 0, 4096)
        request = pb.ModelInferRequest()
        params = request.outputs.add(name="y").parameters
        params["shared_memory_region"].string_param = "out"
        params["shared_memory_byte_size"].int64_param = 16
        targets = registry.output_targets(request, "m")
        registry.unregister("out")            # the client gave up meanwhile
        with pytest.raises(TensorError, match="region 'out' was unregistered while"):
            registry.write_outputs("m", targets, {"y": np.ones(4, np.float32)})
    finally:
        registry.close()
        memory.close()
        memory.unlink()


def test_a_caller_that_stops_reading_answers_loses_its_connection(monkeypatch):
    """Answers to a caller that reads nothing fill the socket: the send gives up after
    ANSWER_SEND_TIMEOUT_S and ends that connection (its thread is free again), instead of
    blocking the answering thread for ever."""
    from wpk.runtime import link_server

    monkeypatch.setattr(link_server, "ANSWER_SEND_TIMEOUT_S", 0.3)
    big = {"y": np.ones(1 << 18, np.float32)}    # 1 MiB per answer
    server = LinkServer("127.0.0.1", 0, lambda frame, reply: reply.ok(big))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as mute:
            mute.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                for i in range(64):   # 64 MiB of answers: far more than the socket buffers
                    send_parts(mute, encode(REQUEST, i, {"a": np.ones(2)}, model="m"))
            except OSError:
                pass   # closed on us: what the test waits for
            deadline = time.monotonic() + 5
            while server.connections and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not server.connections, "the answering thread is still blocked"
    finally:
        server.close()


def test_the_expiry_heap_does_not_grow_behind_a_hung_request():
    """One request hangs (its deadline is the earliest); thousands are answered meanwhile: their
    entries must not pile up in the heap until the hung one expires."""
    expiry = Expiry()
    try:
        hung = expiry.add(time.monotonic() + 20, None, 0)   # earliest: the head
        for i in range(1, 5001):
            expiry.discard(expiry.add(time.monotonic() + 30, None, i))
        assert len(expiry._heap) < 2 * Expiry.COMPACT_AT + 2
        assert hung in expiry._heap and hung[4]
    finally:
        expiry.close()


def test_a_connection_closed_mid_flight_fails_every_pending_request_exactly_once():
    """The downstream reads 50 requests, answers 10 of them, then drops the connection:
    10 answers, 40 UNAVAILABLE, each request's callback once, none left waiting."""
    seen = []
    listener = socket.create_server(("127.0.0.1", 0))

    def downstream():
        sock, _ = listener.accept()
        reader = FrameReader(sock)
        for i in range(50):
            frame = reader.read()
            if i % 5 == 0:
                send_parts(sock, encode(ANSWER, frame.request_id, frame.arrays("m")))
        sock.close()

    threading.Thread(target=downstream, daemon=True).start()

    async def scenario():
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(listener.getsockname())
        connection = LinkConnection(sock, Expiry())
        futures = []
        for i in range(50):
            future = loop.create_future()
            futures.append(future)

            def done(outcome, i=i, future=future):
                seen.append(i)
                loop.call_soon_threadsafe(future.set_result, outcome)
            connection.send(lambda rid, i=i: encode(REQUEST, rid, {"a": np.full(2, i, float)},
                                                    model="m"), 30.0, done)
        outcomes = await asyncio.wait_for(asyncio.gather(*futures), 10)
        await asyncio.sleep(0.1)
        connection.close()
        return outcomes

    try:
        outcomes = asyncio.run(scenario())
    finally:
        listener.close()
    assert sorted(seen) == list(range(50))   # each once
    answered = [o for o in outcomes if isinstance(o, dict)]
    failed = [o for o in outcomes if isinstance(o, TierError)]
    assert len(answered) == 10 and len(failed) == 40
    assert all(f.code == grpc.StatusCode.UNAVAILABLE for f in failed)


def test_a_region_too_large_to_map_is_a_clear_error():
    """A (sparse) object of 128 TiB registers whole: mmap fails (ENOMEM); the client gets
    RESOURCE_EXHAUSTED naming the tier, region and key, not an unexpected exception."""
    key = f"wpk_test_huge_{os.getpid()}"
    fd = os.open(f"/dev/shm/{key}", os.O_CREAT | os.O_RDWR, 0o600)
    registry = SharedMemoryRegistry("tier 'test'")
    try:
        os.ftruncate(fd, 1 << 47)
        with pytest.raises(TierError) as info:
            registry.register("huge", f"/{key}", 0, 1 << 47)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tier 'test'" in info.value.details and "'huge'" in info.value.details
        assert not registry.regions
    finally:
        registry.close()
        os.close(fd)
        os.unlink(f"/dev/shm/{key}")


class Recorder:
    """Stands for a connection: records the requests the expiry thread fails."""

    def __init__(self):
        self.expired = []
        self.event = threading.Event()

    def expire(self, request_id):
        self.expired.append(request_id)
        self.event.set()


def test_a_far_deadline_does_not_kill_the_expiry_thread():
    """A frame may carry any timeout (1e300 ms): the thread's wait must not overflow, or no
    request on that tier would ever expire again."""
    expiry, connection = Expiry(), Recorder()
    try:
        expiry.add(time.monotonic() + 1e297, connection, 1)
        time.sleep(0.1)                     # the thread now waits for the far deadline
        expiry.add(time.monotonic() + 0.1, connection, 2)
        assert connection.event.wait(3.0), "the expiry thread is dead"
        assert connection.expired == [2]
    finally:
        expiry.close()


def test_a_very_long_error_message_is_cut_not_a_broken_connection():
    """An error longer than the peer's staging buffer would make the answer an invalid frame
    and drop the connection with every request on it: it is cut instead."""
    def handle(frame, reply):
        if frame.meta["m"] == "long":
            reply.fail(grpc.StatusCode.INTERNAL, "tier 'edge': slice failed: " + "x" * 400_000)
        else:
            reply.ok(frame.arrays("m"))

    server = LinkServer("127.0.0.1", 0, handle)
    outcomes = []
    finished = threading.Semaphore(0)
    connection = LinkConnection(socket.create_connection(("127.0.0.1", server.port)), Expiry())
    try:
        for model in ("long", "short"):
            connection.send(lambda rid, m=model: encode(REQUEST, rid, {"a": np.ones(2)}, model=m),
                            5.0, lambda outcome: (outcomes.append(outcome), finished.release()))
            assert finished.acquire(timeout=5)
    finally:
        connection.close()
        server.close()
    long, short = outcomes
    assert long.code == grpc.StatusCode.INTERNAL and long.details.startswith("tier 'edge'")
    assert long.details.endswith("[...]") and len(long.details) < 20_000
    np.testing.assert_array_equal(short["a"], np.ones(2))


SHRUNK = """
import os, sys
from wpk.runtime import protocol as pb
from wpk.runtime.shared_memory import SharedMemoryRegistry
from wpk.runtime.tensors import TensorError
key = sys.argv[1]
registry = SharedMemoryRegistry("tier 'test'")
registry.register("r", "/" + key, 0, 1 << 16)
os.truncate("/dev/shm/" + key, 0)          # the client re-created the object smaller
params = pb.ModelInferRequest().inputs.add().parameters
params["shared_memory_region"].string_param = "r"
params["shared_memory_byte_size"].int64_param = 1 << 16
try:
    print(float(registry.input_array("m", "x", "FP32", (1 << 14,), params).sum()))
except TensorError as error:
    print(error)
"""


def test_an_object_shrunk_after_registration_is_an_error_not_sigbus():
    """Reading a mapping past the end of its (truncated) object raises SIGBUS: the tier
    would die. Checked per request (in a child process: without the check it crashes)."""
    import subprocess
    import sys

    key = f"wpk_test_shrunk_{os.getpid()}"
    with open(f"/dev/shm/{key}", "wb") as f:
        f.truncate(1 << 16)
    try:
        run = subprocess.run([sys.executable, "-c", SHRUNK, key], capture_output=True,
                             text=True, timeout=60)
    finally:
        os.unlink(f"/dev/shm/{key}")
    assert run.returncode == 0, run.stderr[-500:]
    assert "shrank to 0 bytes after it was registered" in run.stdout


def test_connections_beyond_the_cap_are_refused_and_the_others_served(monkeypatch):
    """Each connection costs a thread: past MAX_CONNECTIONS new ones are closed at once
    (counted, one line logged); those already open keep working."""
    from wpk.runtime import link_server

    monkeypatch.setattr(link_server, "MAX_CONNECTIONS", 2)
    server = LinkServer("127.0.0.1", 0, lambda frame, reply: reply.ok({"y": np.ones(2)}))
    opened = []
    try:
        for _ in range(3):
            opened.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        refusal = FrameReader(opened[2]).read()   # refused: says so (request id 0), closes
        assert (refusal.kind, refusal.request_id) == (ANSWER, 0)
        assert refusal.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "2 tensor-link connections open" in refusal.meta["e"]
        assert opened[2].recv(1) == b""
        assert server.refused == 1 and len(server.connections) == 2
        send_parts(opened[0], encode(REQUEST, 7, {"a": np.ones(2)}, model="m"))
        frame = FrameReader(opened[0]).read()
        assert frame.kind == ANSWER and frame.request_id == 7
    finally:
        for sock in opened:
            sock.close()
        server.close()


def test_more_queued_answers_than_one_sendmsg_takes_arrive_whole_and_in_order():
    """1500 answers (4500 buffers) wait while the caller reads nothing: the writer sends them
    MAX_IOV buffers at a time (Linux refuses over 1024 in one sendmsg)."""
    server = LinkServer("127.0.0.1", 0, lambda frame, reply: None)
    caller = socket.socket()
    try:
        caller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        caller.connect(("127.0.0.1", server.port))
        deadline = time.monotonic() + 5
        while not server.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        connection = next(iter(server.connections))
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        arrays = {"a": np.ones(256, np.float32), "b": np.arange(256, dtype=np.float32)}
        with connection.lock:   # the writer waits for it: it then takes them all in one go
            for i in range(1500):
                connection.send(encode(ANSWER, i + 1, arrays))
            assert len(connection.backlog) > 1024
        reader = FrameReader(caller)
        for i in range(1500):
            frame = reader.read()
            assert frame.request_id == i + 1
            np.testing.assert_array_equal(frame.arrays("answer")["b"], arrays["b"])
        assert not connection.closed
    finally:
        caller.close()
        server.close()
