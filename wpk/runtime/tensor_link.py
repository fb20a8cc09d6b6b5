"""The tensor link: a tier's fast data plane towards the next tier, over plain TCP.

`LinkConnection` (the upstream side) is one persistent full-duplex connection: requests are
multiplexed by id, answers are matched by id (in any order) by a reader thread, which calls
each request's `done` callback. A broken connection fails every pending request with
UNAVAILABLE; `Expiry` fails those whose deadline passes first with DEADLINE_EXCEEDED. Between tiers on one host, large payloads
travel through a shared-memory lane (see lane) instead of the socket, where the receiver
maps lanes (advertised as LANE_EXTENSION). The downstream side is link_server.LinkServer.
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

from wpk.runtime.link_frames import (ANSWER, LANE_OPEN, Frame, FrameError, FrameReader,
                                     encode_meta, send_parts)
from wpk.runtime.lane import LANE_MIN_BYTES, LaneWriter
from wpk.runtime.status import TierError, code_of
from wpk.runtime.tensors import TensorError

EXTENSION_PREFIX = "wpk-tensor-link:"   # ServerMetadata extension advertising the port
LANE_EXTENSION = "wpk-tensor-lane"      # ... and the one saying it maps lanes (see lane)
LANE_OPEN_TIMEOUT_S = 5.0

Done = Callable[[object], None]


KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 10, 5, 3
REFUSED = grpc.StatusCode.RESOURCE_EXHAUSTED   # the status of a refused connection (an
# answer to request id 0, from link_server)


def send_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking send waits at most `seconds` (SO_SNDTIMEO), then fails with EAGAIN."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    whole.to_bytes(8, sys.byteorder) +
                    int((seconds - whole) * 1e6).to_bytes(8, sys.byteorder))


def nodelay(sock: socket.socket) -> None:
    """No Nagle delay; TCP keepalive, so that a peer gone without a word (host down, network
    cut) ends the connection within ~25 s: its pending requests fail with UNAVAILABLE and
    the next request reconnects, instead of frames vanishing into a half-open connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def log(line: str) -> None:
    print(f"wpk: {line}", file=sys.stderr, flush=True)


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
        log(f"tensor link: answer callback failed: {error!r}")


def _frame_error(frame: Frame) -> TierError:
    """The error an answer frame with a status carries."""
    return TierError(code_of(frame.status),
                     str(frame.meta.get("e", "")))


def _deliver(frame: Frame, callback: Done, on_bytes: Callable[[int], None] | None) -> None:
    """Hand an answer frame to its request's callback (arrays, or the error it carries)."""
    if frame.status:
        _call(callback, _frame_error(frame))
        return
    if on_bytes is not None:
        on_bytes(frame.nbytes)
    try:
        arrays = frame.arrays("answer")
    except TensorError as bad:
        outcome: object = TierError(grpc.StatusCode.INTERNAL, f"bad answer: {bad}")
    except Exception as bad:  # descriptors that are JSON but not tensors
        outcome = TierError(grpc.StatusCode.INTERNAL, f"bad answer: {bad!r}")
    else:
        outcome = arrays
    _call(callback, outcome)


def _refusal(frame: Frame) -> TierError | None:
    """The error of a connection-level answer (request id 0: the server refused us)."""
    return _frame_error(frame) if frame.request_id == 0 and frame.status else None


class LinkConnection:
    """One connection to a LinkServer. `send()` from any thread; `done(outcome)` is called
    once per request, with the answer's arrays or a TierError, from the reader thread
    (answers, a broken connection), the expiry thread, or the sender (a failed write).
    Large payloads go through the sending side's lane (see lane), opened once the connection
    carries a payload of LANE_MIN_BYTES or more, where the receiver maps lanes. `answered`:
    whether any answer came back on the connection."""

    lane: LaneWriter | None = None
    answered = False
    _lane_lock = threading.Lock()   # one lane opened at a time, whichever connection

    def __init__(self, sock: socket.socket, expiry: Expiry,
                 on_bytes: Callable[[int], None] | None = None, lanes: bool = False):
        """`lanes`: the receiver maps shared-memory lanes (it advertises LANE_EXTENSION)."""
        nodelay(sock)
        self.sock = sock
        self.lanes = lanes
        self.expiry = expiry
        self.on_bytes = on_bytes
        self.pending: dict[int, Done] = {}
        self.error: TierError | None = None
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
            self.fail(TierError(grpc.StatusCode.UNAVAILABLE, f"connection lost ({error})"))
        if self.error is not None:  # failed before or while we sent
            callback = self.pending.pop(request_id, None)
            if callback is not None:
                _call(callback, self.error)

    def _read(self) -> None:
        reader = FrameReader(self.sock)
        error = TierError(grpc.StatusCode.UNAVAILABLE, "connection closed by the peer")
        try:
            while True:
                ended = self._take(reader.read())
                if ended is not None:
                    error = ended
                    break
        except EOFError:
            pass
        except (OSError, FrameError) as failure:
            error = TierError(grpc.StatusCode.UNAVAILABLE, f"connection lost ({failure})")
        except Exception as failure:  # the reader must not die leaving requests waiting
            error = TierError(grpc.StatusCode.UNAVAILABLE, f"connection lost ({failure!r})")
        self.fail(error)
        with self._send_lock:  # no sender is inside the socket now, and none will enter
            self.sock.close()

    def fail(self, error: TierError) -> None:
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
        self.fail(TierError(grpc.StatusCode.CANCELLED, "link closed"))
        self._reader.join(1.0)

    def _take(self, frame: Frame) -> TierError | None:
        """Hand an answer frame to its request; returns the error that ends the connection
        (a request frame, a refusal), if any."""
        if frame.kind != ANSWER:  # before its request leaves `pending`: fail() has it
            return TierError(grpc.StatusCode.UNAVAILABLE,
                             "connection lost (request frame sent to a client)")
        refusal = _refusal(frame)
        if refusal is not None:
            return refusal
        self.answered = True
        if self.lane is not None:
            self.lane.release(frame.request_id)
        callback = self.pending.pop(frame.request_id, None)
        if callback is not None:  # None: expired meanwhile, the caller has its answer
            _deliver(frame, callback, self.on_bytes)
        return None

    def expire(self, request_id: int) -> None:
        callback = self.pending.pop(request_id, None)
        if callback is not None:
            _call(callback, TierError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))

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
            log(f"tensor link: no shared-memory lane ({error}); payloads go inline")
            return
        self.lane = lane
        self.send(lambda rid: encode_meta(LANE_OPEN, rid, lane.open_meta()),
                  LANE_OPEN_TIMEOUT_S,
                  lambda outcome: lane.attached(not isinstance(outcome, Exception)))

    def _close_lane(self) -> None:
        if self.lane is not None:
            self.lane.close()
