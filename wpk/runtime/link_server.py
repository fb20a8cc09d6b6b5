"""The downstream side of the tensor link (see tensor_link): `LinkServer` accepts connections
on its own port; one thread per connection reads request frames and hands each to the tier's
handler in that same thread (the slice runs there: ONNX Runtime releases the GIL, and no
hand-off to another thread or an event loop is paid). The handler answers through a `Reply`,
from whichever thread has the answer (the next tier's reader thread, when the tier
forwards); answers never block that thread (see _ServerConnection). Senders on this host may
open a shared-memory lane (see lane), which the server maps (`lanes`, advertised as
LANE_EXTENSION).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import grpc
import numpy as np

from wpk.runtime.link_frames import (ANSWER, LANE_OPEN, LANE_REQUEST, MAX_PAYLOAD_BYTES, REQUEST,
                                     Frame, FrameError, FrameReader, encode, send_nowait,
                                     send_parts)
from wpk.runtime.lane import LaneReader, over_loopback
from wpk.runtime.tensor_link import REFUSED, log, nodelay, send_timeout

MAX_ERROR_CHARS = 16 * 1024   # longer error messages are cut (link_frames.STAGING_BYTES holds them)
ANSWER_SEND_TIMEOUT_S = 10.0   # answers that make no progress this long (the caller stopped
# reading) end their connection
READ_PAUSE_BYTES = 8 << 20     # a connection stops reading requests while more answer bytes
# than this wait for its caller to read them (backpressure on that caller alone)
MAX_CONNECTIONS = 128          # a LinkServer refuses connections beyond this many (one thread
# each: the entry tier's link also serves clients); the refused fall back to gRPC
REFUSAL_LOG_S = 10.0           # at most one "refused" line per this many seconds


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
                with self.write_lock:
                    try:
                        views = send_nowait(self.sock, views)
                    except OSError:   # the caller has gone
                        return self._abandon()
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
            log(f"{self.owner.where}tensor link from {self.peer}: {error}; connection closed")
        except Exception as error:  # e.g. MemoryError: never leave the connection half alive
            log(f"{self.owner.where}tensor link from {self.peer}: {error!r}; connection "
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
            nodelay(sock)
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
            log(f"{self.where}tensor link: {MAX_CONNECTIONS} connections open; refused "
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

