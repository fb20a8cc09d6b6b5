"""The tensor link: a tier's fast data plane towards the next tier, over plain TCP.

`LinkServer` (the downstream side) accepts connections on its own port; one thread per
connection reads request frames and hands each to the tier's handler in that same thread (the
slice runs there: ONNX Runtime releases the GIL, and no hand-off to another thread or an event
loop is paid). The handler answers through a `Reply`, from whichever thread has the answer
(the next tier's reader thread, when the tier forwards).

`LinkConnection` (the upstream side) is one persistent full-duplex connection: requests are
multiplexed by id, answers are matched by id (in any order) by a reader thread, which calls
each request's `done` callback. A broken connection fails every pending request with
UNAVAILABLE; `Expiry` fails those whose deadline passes first with DEADLINE_EXCEEDED.
Between tiers on one host, large payloads travel through a shared-memory lane (see lane)
instead of the socket, where the LinkServer maps lanes (`lanes`, advertised as
LANE_EXTENSION).
"""
from __future__ import annotations

import heapq
import itertools
import socket
import sys
import threading
import time
from typing import Callable

import grpc
import numpy as np

from wpk.runtime.frames import (ANSWER, LANE_OPEN, LANE_REQUEST, MAX_IOV, MAX_PAYLOAD_BYTES,
                                REQUEST, Frame, FrameError, FrameReader, encode, encode_meta,
                                send_parts, unsent)
from wpk.runtime.lane import LANE_MIN_BYTES, LaneReader, LaneWriter, over_loopback
from wpk.runtime.link import CODES, InferenceError
from wpk.runtime.tensors import TensorError

EXTENSION_PREFIX = "wpk-tensor-link:"   # ServerMetadata extension advertising the port
LANE_EXTENSION = "wpk-tensor-lane"      # ... and the one saying it maps lanes (see lane)
LANE_OPEN_TIMEOUT_S = 5.0

Done = Callable[[object], None]


KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 10, 5, 3
MAX_ERROR_CHARS = 16 * 1024   # longer error messages are cut (frames.STAGING_BYTES holds them)
ANSWER_SEND_TIMEOUT_S = 10.0   # answers that make no progress this long (the caller stopped
# reading) end their connection
READ_PAUSE_BYTES = 8 << 20     # a connection stops reading requests while more answer bytes
# than this wait for its caller to read them (backpressure on that caller alone)
MAX_CONNECTIONS = 128          # a LinkServer refuses connections beyond this many (one thread
# each: the entry tier's link also serves clients); the refused fall back to gRPC
REFUSED = grpc.StatusCode.RESOURCE_EXHAUSTED   # the status of a refusal (request id 0)
REFUSAL_LOG_S = 10.0           # at most one "refused" line per this many seconds


def send_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking send waits at most `seconds` (SO_SNDTIMEO), then fails with EAGAIN."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    whole.to_bytes(8, sys.byteorder) +
                    int((seconds - whole) * 1e6).to_bytes(8, sys.byteorder))


def _nodelay(sock: socket.socket) -> None:
    """No Nagle delay; TCP keepalive, so that a peer gone without a word (host down, network
    cut) ends the connection within ~25 s: its pending requests fail with UNAVAILABLE and
    the next request reconnects, instead of frames vanishing into a half-open connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


class Reply:
    """Answers one request frame on the connection it came from (once)."""

    __slots__ = ("connection", "request_id")

    def __init__(self, connection: "_ServerConnection", request_id: int):
        self.connection, self.request_id = connection, request_id

    def ok(self, arrays: dict[str, np.ndarray]) -> int:
        """Send the answer's tensors (raw); returns their bytes."""
        parts = encode(ANSWER, self.request_id, arrays)
        self.connection.send(parts)
        return sum(memoryview(p).nbytes for p in parts[1:])

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        if len(message) > MAX_ERROR_CHARS:  # the frame's metadata must fit the peer's staging
            message = message[:MAX_ERROR_CHARS] + " [...]"
        self.connection.send(encode(ANSWER, self.request_id, None, status=code.value[0],
                                    error=message))


Handler = Callable[[Frame, Reply], None]


def _log(line: str) -> None:
    print(f"wpk: {line}", file=sys.stderr, flush=True)


class _ServerConnection:
    """One caller's connection: a thread reads its requests and hands them to the handler.

    Answers come from any thread (often one that serves many callers: the reader of the
    next tier's answers), so `send()` never blocks: what the socket does not take at once
    waits in a backlog that a writer thread of this connection drains. A caller that stops
    reading thus holds up only itself: its connection stops reading requests once
    READ_PAUSE_BYTES of answers wait, and ends when its answers make no progress for
    ANSWER_SEND_TIMEOUT_S."""

    def __init__(self, sock: socket.socket, handle: Handler, owner: "LinkServer"):
        self.sock, self.handle, self.owner = sock, handle, owner
        try:
            self.peer = "%s:%s" % sock.getpeername()[:2]
        except OSError:
            self.peer = "?"
        self.loopback = over_loopback(sock)
        self.lock = threading.Condition()   # closed, backlog, writing
        self.write_lock = threading.Lock()  # held around every write; the fd closes under it
        self.closed = False
        self.backlog: list[memoryview] = []  # answer bytes the socket has not taken yet
        self.backlog_bytes = 0
        self.writing = False                 # the writer thread is sending part of them
        self.writer: threading.Thread | None = None
        self.lane: LaneReader | None = None  # the sender's, once it opened one
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="wpk-link-in")

    def send(self, parts: list) -> None:
        """Queue one frame's buffers for the caller; never blocks on the caller."""
        views = [memoryview(p) for p in parts]
        with self.lock:
            if self.closed:
                return
            if not self.backlog and not self.writing:   # nothing ahead of it: try at once
                now, later = views[:MAX_IOV], views[MAX_IOV:]
                with self.write_lock:
                    try:
                        sent = self.sock.sendmsg(now, (), socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:   # the caller has gone
                        sent = -1
                if sent < 0:
                    return self._abandon()
                views = unsent(now, sent) + later
                if not views:
                    return
            # Kept however large: the arrays are in memory already (the backlog only
            # references them); a caller that stops reading ends by the send timeout.
            self.backlog.extend(views)
            self.backlog_bytes += sum(v.nbytes for v in views)
            if self.writer is None:
                self.writer = threading.Thread(target=self._write, daemon=True,
                                               name="wpk-link-answers")
                self.writer.start()
            self.lock.notify_all()

    def _write(self) -> None:
        """Drain the backlog with blocking writes (SO_SNDTIMEO: ANSWER_SEND_TIMEOUT_S)."""
        while True:
            with self.lock:
                while not self.backlog and not self.closed:
                    self.lock.wait()
                if self.closed:
                    return
                views, self.backlog = self.backlog, []
                self.writing = True
            try:
                with self.write_lock:
                    send_parts(self.sock, views)
            except BaseException:   # the caller has gone, or stopped reading (OSError), or
                with self.lock:     # worse: part of a frame may have gone out, the stream
                    self.writing = False  # is unusable, end it
                    self._abandon()
                return
            with self.lock:
                self.writing = False
                self.backlog_bytes -= sum(v.nbytes for v in views)
                self.lock.notify_all()

    def _abandon(self) -> None:
        """End the connection (with self.lock held): the reader and the writer stop. The
        fd is shut down once, before close() can close it (it needs self.lock first)."""
        if not self.closed:
            self.closed = True
            self._shutdown()
        self.backlog, self.backlog_bytes = [], 0
        self.lock.notify_all()

    def _wait_for_answers_to_drain(self) -> None:
        with self.lock:
            while self.backlog_bytes > READ_PAUSE_BYTES and not self.closed:
                self.lock.wait()

    def _open_lane(self, frame: Frame) -> None:
        """Map the sender's lane (see lane) and say whether it worked: only for a sender on
        loopback, once per connection."""
        if self.lane is not None:
            raise FrameError("a second lane on one connection")
        reply = Reply(self, frame.request_id)
        if not self.owner.lanes:
            return reply.fail(grpc.StatusCode.UNIMPLEMENTED, "lanes are disabled here")
        if not self.loopback:
            return reply.fail(grpc.StatusCode.PERMISSION_DENIED, "lanes are for loopback peers")
        try:
            self.lane = LaneReader(frame.meta)
        except OSError as error:  # not on this host, or not ours to read
            return reply.fail(grpc.StatusCode.UNAVAILABLE, f"cannot map the lane: {error}")
        reply.ok({})

    def _run(self) -> None:
        reader = FrameReader(self.sock, max_payload=self.owner.max_payload)
        try:
            while True:
                frame = reader.read()
                if frame.kind == LANE_OPEN:
                    self._open_lane(frame)
                    continue
                if frame.kind == LANE_REQUEST:
                    if self.lane is None:
                        raise FrameError("lane request on a connection without a lane")
                    frame = self.lane.resolve(frame, self.owner.max_payload)
                elif frame.kind != REQUEST:
                    raise FrameError("answer frame sent to a tier")
                self.handle(frame, Reply(self, frame.request_id))
                self._wait_for_answers_to_drain()
        except (EOFError, OSError):
            pass
        except FrameError as error:  # garbled or hostile bytes: drop this connection only
            _log(f"{self.owner.where}tensor link from {self.peer}: {error}; connection closed")
        except Exception as error:  # e.g. MemoryError: never leave the connection half alive
            _log(f"{self.owner.where}tensor link from {self.peer}: {error!r}; connection "
                 f"closed")
        finally:
            self.close()
            self.owner.connections.discard(self)

    def _shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked on a full buffer
        except OSError:
            pass

    def close(self) -> None:
        with self.lock:
            self._abandon()     # a write in progress fails at once
        with self.write_lock:   # no write is inside the fd now, and none will enter
            if self.sock.fileno() >= 0:
                self.sock.close()


class LinkServer:
    """Listens on (host, port) (0: a free port, in `.port`); serves frames to `handle`.
    `max_payload`: larger frames close their connection; `where` starts log lines;
    `lanes`: accept the shared-memory lanes of senders on this host."""

    def __init__(self, host: str, port: int, handle: Handler, *,
                 max_payload: int = MAX_PAYLOAD_BYTES, where: str = "", lanes: bool = True):
        self.handle = handle
        self.lanes = lanes   # map the lanes senders on this host open (see lane)
        self.max_payload = max_payload
        self.where = f"{where}: " if where else ""
        self.listener = socket.create_server((host, port))
        self.port = self.listener.getsockname()[1]
        self.connections: set[_ServerConnection] = set()
        self.refused = 0                 # connections turned away at MAX_CONNECTIONS
        self._refusal_logged = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True,
                                        name="wpk-link-accept")
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # closed
            if len(self.connections) >= MAX_CONNECTIONS:
                self._refuse(sock)
                continue
            _nodelay(sock)
            send_timeout(sock, ANSWER_SEND_TIMEOUT_S)
            connection = _ServerConnection(sock, self.handle, self)
            self.connections.add(connection)
            if self._closed:  # accepted while close() ran: it may not have seen this one
                connection.close()
                self.connections.discard(connection)
                return
            connection.thread.start()

    def _refuse(self, sock: socket.socket) -> None:
        """Say why (an error answer to request id 0: the caller falls back to gRPC), close."""
        self.refused += 1
        try:
            sock.settimeout(1.0)
            send_parts(sock, encode(ANSWER, 0, None, status=REFUSED.value[0],
                                    error=f"{self.where}{MAX_CONNECTIONS} tensor-link "
                                          f"connections open"))
        except OSError:
            pass
        sock.close()
        if time.monotonic() - self._refusal_logged >= REFUSAL_LOG_S:
            self._refusal_logged = time.monotonic()
            _log(f"{self.where}tensor link: {MAX_CONNECTIONS} connections open; refused "
                 f"{self.refused} so far")

    def close(self) -> None:
        self._closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for connection in list(self.connections):
            connection.close()


MAX_WAIT_S = 3600.0


class Expiry:
    """One thread that fails requests whose deadline passed (DEADLINE_EXCEEDED).

    Answered requests leave the heap when they reach its head (requests mostly finish in
    order), so the heap holds about the pending requests only and the thread sleeps until the
    earliest live deadline: it wakes about once per timeout, not once per request. It is
    notified only for a deadline earlier than the time it will wake anyway. Answered entries
    behind an early one that stays pending (a hung request) are swept out once they are most
    of the heap, so that it does not grow with every request answered meanwhile."""

    COMPACT_AT = 1024   # answered entries left behind the head before a sweep is considered

    def __init__(self) -> None:
        self._dead = 0                       # answered entries left in the heap (about)
        self._heap: list[list] = []          # [deadline, seq, connection, request_id, live]
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._wake_at = float("inf")
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, deadline: float, connection: "LinkConnection", request_id: int) -> list:
        entry = [deadline, next(self._seq), connection, request_id, True]
        with self._lock:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="wpk-link-expiry")
                self._thread.start()
            elif deadline < self._wake_at:
                self._wake.notify()
        return entry

    def discard(self, entry: list) -> None:
        """The request was answered: its deadline no longer matters."""
        entry[4] = False
        heap = self._heap
        try:
            head = heap[0]   # read without the lock: the expiry thread may empty the heap
        except IndexError:
            return
        if head is entry:
            with self._lock:
                while heap and not heap[0][4]:
                    heapq.heappop(heap)
            return
        self._dead += 1   # not exact under threads: it only decides when to sweep
        if self._dead > self.COMPACT_AT and self._dead * 2 > len(heap):
            with self._lock:
                heap[:] = [e for e in heap if e[4]]
                heapq.heapify(heap)
                self._dead = 0

    def _run(self) -> None:
        while True:
            expired = []
            with self._wake:
                while not self._closed:
                    now = time.monotonic()
                    while self._heap and (self._heap[0][0] <= now or not self._heap[0][4]):
                        entry = heapq.heappop(self._heap)
                        if entry[4]:
                            expired.append(entry)
                    if expired:
                        break
                    self._wake_at = self._heap[0][0] if self._heap else float("inf")
                    # capped: a far deadline (a frame may carry any timeout) must not
                    # overflow the wait and kill this thread
                    self._wake.wait(min(self._wake_at - now, MAX_WAIT_S) if self._heap
                                    else None)
                    self._wake_at = 0.0
                if self._closed:
                    return
            for _, _, connection, request_id, _ in expired:
                connection.expire(request_id)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._heap.clear()
            self._wake.notify()


def _call(callback: Done, outcome: object) -> None:
    """Run a request's callback; one that raises must not stop the thread that answers the
    other requests."""
    try:
        callback(outcome)
    except Exception as error:
        _log(f"tensor link: answer callback failed: {error!r}")


def _deliver(frame: Frame, callback: Done, on_bytes: Callable[[int], None] | None) -> None:
    """Hand an answer frame to its request's callback (arrays, or the error it carries)."""
    if frame.status:
        _call(callback, InferenceError(CODES.get(frame.status, grpc.StatusCode.UNKNOWN),
                                       str(frame.meta.get("e", ""))))
        return
    if on_bytes is not None:
        on_bytes(frame.nbytes)
    try:
        arrays = frame.arrays("answer")
    except TensorError as bad:
        outcome: object = InferenceError(grpc.StatusCode.INTERNAL, f"bad answer: {bad}")
    except Exception as bad:  # descriptors that are JSON but not tensors
        outcome = InferenceError(grpc.StatusCode.INTERNAL, f"bad answer: {bad!r}")
    else:
        outcome = arrays
    _call(callback, outcome)


def _refusal(frame: Frame) -> InferenceError | None:
    """The error of a connection-level answer (request id 0: the server refused us)."""
    if frame.request_id == 0 and frame.status:
        return InferenceError(CODES.get(frame.status, grpc.StatusCode.UNKNOWN),
                              str(frame.meta.get("e", "")))
    return None


class _Lanes:
    """The sending side's lane (see lane), for both connection kinds: opened once the
    connection carries a payload of LANE_MIN_BYTES or more, where the receiver maps lanes.
    (Also `answered`: whether any answer came back on the connection.)"""

    lane: LaneWriter | None = None
    answered = False
    _lane_lock = threading.Lock()   # one lane opened at a time, whichever connection

    def _through_lane(self, request_id: int, parts: list) -> list:
        """`parts` with the payload moved into the lane, where it can go; else `parts`.
        (A payload sent inline may be a view of the lane this tier received it in; if the
        send blocks past its request's deadline, the upstream may reuse that slot while
        bytes still leave from it: the next tier then gets a torn tensor, but its answer is
        thrown away, the request having failed already.)"""
        lane = self.lane
        if lane is not None:
            return lane.place(request_id, parts) or parts
        if self.lanes:
            payload = sum(memoryview(p).nbytes for p in parts[1:])
            if payload >= LANE_MIN_BYTES:
                with self._lane_lock:   # senders on several threads: one lane, one LANE_OPEN
                    opening, self.lanes = self.lanes, False
                if opening:
                    self._open_lane(payload)
        return parts

    def _open_lane(self, payload: int) -> None:
        try:
            lane = LaneWriter(payload)
        except OSError as error:   # no /dev/shm, or too little room in it
            _log(f"tensor link: no shared-memory lane ({error}); payloads go inline")
            return
        self.lane = lane
        self.send(lambda rid: encode_meta(LANE_OPEN, rid, lane.open_meta()),
                  LANE_OPEN_TIMEOUT_S,
                  lambda outcome: lane.attached(not isinstance(outcome, Exception)))

    def _answered(self, request_id: int) -> None:
        if self.lane is not None:
            self.lane.release(request_id)

    def _close_lane(self) -> None:
        if self.lane is not None:
            self.lane.close()


class LinkConnection(_Lanes):
    """One connection to a LinkServer. `send()` from any thread; `done(outcome)` is called
    once per request, with the answer's arrays or an InferenceError, from the reader thread
    (answers, a broken connection), the expiry thread, or the sender (a failed write)."""

    threaded = True

    def __init__(self, sock: socket.socket, expiry: Expiry,
                 on_bytes: Callable[[int], None] | None = None, lanes: bool = False):
        """`lanes`: the receiver maps shared-memory lanes (it advertises LANE_EXTENSION)."""
        _nodelay(sock)
        self.sock = sock
        self.lanes = lanes
        self.expiry = expiry
        self.on_bytes = on_bytes
        self.pending: dict[int, Done] = {}
        self.error: InferenceError | None = None
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._reader = threading.Thread(target=self._read, daemon=True, name="wpk-link-out")
        self._reader.start()

    def send(self, parts_for: Callable[[int], list], timeout: float | None, done: Done) -> None:
        """`parts_for(request_id)`: the frame's buffers. Never raises: failures go to `done`."""
        request_id = next(self._ids)
        parts = self._through_lane(request_id, parts_for(request_id))
        if timeout is not None:
            entry: list = []   # known before the expiry thread can fire for this request
            self.pending[request_id] = lambda outcome: (entry and self.expiry.discard(entry[0]),
                                                        done(outcome))
            entry.append(self.expiry.add(time.monotonic() + timeout, self, request_id))
        else:
            self.pending[request_id] = done
        try:
            with self._send_lock:
                if self.error is None:
                    send_parts(self.sock, parts)
        except OSError as error:
            self.fail(InferenceError(grpc.StatusCode.UNAVAILABLE, f"connection lost ({error})"))
        if self.error is not None:  # failed before or while we sent
            callback = self.pending.pop(request_id, None)
            if callback is not None:
                _call(callback, self.error)

    def expire(self, request_id: int) -> None:
        callback = self.pending.pop(request_id, None)
        if callback is not None:
            _call(callback, InferenceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                           "deadline exceeded"))

    def _read(self) -> None:
        reader = FrameReader(self.sock)
        error = InferenceError(grpc.StatusCode.UNAVAILABLE, "connection closed by the peer")
        try:
            while True:
                frame = reader.read()
                if frame.kind != ANSWER:  # before its request leaves `pending`: fail() has it
                    raise FrameError("request frame sent to a client")
                refusal = _refusal(frame)
                if refusal is not None:
                    error = refusal
                    break
                self.answered = True
                self._answered(frame.request_id)
                callback = self.pending.pop(frame.request_id, None)
                if callback is not None:  # None: expired meanwhile, the caller has its answer
                    _deliver(frame, callback, self.on_bytes)
        except EOFError:
            pass
        except (OSError, FrameError) as failure:
            error = InferenceError(grpc.StatusCode.UNAVAILABLE, f"connection lost ({failure})")
        except Exception as failure:  # the reader must not die leaving requests waiting
            error = InferenceError(grpc.StatusCode.UNAVAILABLE, f"connection lost ({failure!r})")
        self.fail(error)
        with self._send_lock:  # no sender is inside the socket now, and none will enter
            self.sock.close()

    def fail(self, error: InferenceError) -> None:
        """End the connection: every pending request gets `error`."""
        if self.error is None:
            self.error = error
            self._close_lane()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for request_id in list(self.pending):
            callback = self.pending.pop(request_id, None)
            if callback is not None:
                _call(callback, self.error)

    def close(self) -> None:
        self.fail(InferenceError(grpc.StatusCode.CANCELLED, "link closed"))
        self._reader.join(1.0)


class LoopConnection(_Lanes):
    """A connection driven by an asyncio loop, for a tier whose requests start on the loop
    (the entry tier: gRPC handlers). Answers are read when the loop sees the socket readable,
    so `done` runs on the loop with no reader thread and no hand-off between threads; writes
    that do not fit the socket buffer wait for it to drain (the loop never blocks). Deadlines
    are loop timers. Use from the loop's thread only."""

    threaded = False
    MAX_IOV = MAX_IOV

    def __init__(self, sock: socket.socket, loop, on_bytes: Callable[[int], None] | None = None,
                 lanes: bool = False):
        _nodelay(sock)
        sock.setblocking(False)
        self.sock, self.loop, self.on_bytes = sock, loop, on_bytes
        self.lanes = lanes
        self.fd = sock.fileno()
        self.reader = FrameReader(sock)
        self.pending: dict[int, Done] = {}
        self.timers: dict[int, object] = {}
        self.error: InferenceError | None = None
        self._ids = itertools.count(1)
        self._backlog: list[memoryview] = []   # bytes waiting for the socket to drain
        loop.add_reader(self.fd, self._readable)

    def send(self, parts_for: Callable[[int], list], timeout: float | None, done: Done) -> None:
        if self.error is not None:
            done(self.error)
            return
        request_id = next(self._ids)
        parts = self._through_lane(request_id, parts_for(request_id))
        self.pending[request_id] = done
        if timeout is not None:
            self.timers[request_id] = self.loop.call_later(timeout, self.expire, request_id)
        views = [memoryview(p) for p in parts]
        if self._backlog:
            self._backlog.extend(views)
        else:
            self._write(views)

    def _write(self, views: list[memoryview]) -> None:
        now, later = views[:self.MAX_IOV], views[self.MAX_IOV:]
        try:
            sent = self.sock.sendmsg(now)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            self.fail(InferenceError(grpc.StatusCode.UNAVAILABLE, f"connection lost ({error})"))
            return
        rest = unsent(now, sent) + later
        if rest:
            if not self._backlog:
                self.loop.add_writer(self.fd, self._writable)
            self._backlog = rest

    def _writable(self) -> None:
        views, self._backlog = self._backlog, []
        self.loop.remove_writer(self.fd)
        if views and self.error is None:
            self._write(views)

    def _readable(self) -> None:
        try:
            frames = self.reader.poll()
        except EOFError:
            self.fail(InferenceError(grpc.StatusCode.UNAVAILABLE, "connection closed by the peer"))
            return
        except (OSError, FrameError) as failure:
            self.fail(InferenceError(grpc.StatusCode.UNAVAILABLE, f"connection lost ({failure})"))
            return
        for frame in frames:
            if frame.kind != ANSWER:  # before its request leaves `pending`: fail() has it
                self.fail(InferenceError(grpc.StatusCode.UNAVAILABLE,
                                         "connection lost (request frame sent to a client)"))
                return
            refusal = _refusal(frame)
            if refusal is not None:
                self.fail(refusal)
                return
            self.answered = True
            self._answered(frame.request_id)
            callback = self.pending.pop(frame.request_id, None)
            timer = self.timers.pop(frame.request_id, None)
            if timer is not None:
                timer.cancel()
            if callback is not None:
                _deliver(frame, callback, self.on_bytes)

    def expire(self, request_id: int) -> None:
        self.timers.pop(request_id, None)
        callback = self.pending.pop(request_id, None)
        if callback is not None:
            _call(callback, InferenceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                           "deadline exceeded"))

    def fail(self, error: InferenceError) -> None:
        if self.error is None:
            self.error = error
            self._close_lane()
            self.loop.remove_reader(self.fd)
            if self._backlog:
                self.loop.remove_writer(self.fd)
            self._backlog = []
            self.sock.close()
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        pending, self.pending = self.pending, {}
        for callback in pending.values():
            _call(callback, self.error)

    def close(self) -> None:
        self.fail(InferenceError(grpc.StatusCode.CANCELLED, "link closed"))
