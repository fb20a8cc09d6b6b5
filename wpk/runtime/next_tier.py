"""How a tier reaches the next one: the `NextTier` protocol, one implementation per transport:
`TcpLink` (the tensor link, `tensor_link`, found through the next tier's gRPC ServerMetadata)
or `GrpcLink` (KServe ModelInfer calls: for TLS tiers, and where the next tier has no tensor
link). `InferenceClient(tensor_link=True)` uses
`TcpLink` too, to enter a pipeline over the entry tier's tensor link. Both raise / report
only TierError (UNAVAILABLE, DEADLINE_EXCEEDED, the next tier's own status); the tier core
turns them into messages naming the tier.

`TcpLink` discovers the next tier's tensor-link port once per connection: ServerMetadata's
`extensions` holds `wpk-tensor-link:PORT` (standard clients ignore unknown extensions). A
next tier that advertises none (another KServe server, a wpk tier run with TLS) is
reached over gRPC instead; so is one whose port cannot be connected to (a relay or a
Service that forwards only the gRPC port): that is retried every FALLBACK_RETRY_S.
"""
from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
import warnings
from typing import Callable, Mapping, Protocol

import grpc
import numpy as np

from wpk.errors import refuse_unknown_choice
from wpk.runtime import protocol as pb
from wpk.runtime.codecs import Codec, Encoder
from wpk.runtime.link_frames import REQUEST, encode
from wpk.runtime.lane import LANE_MIN_BYTES, over_loopback
from wpk.runtime.status import TierError
from wpk.runtime.metrics import TierMetrics
from wpk.runtime.tensor_link import (EXTENSION_PREFIX, LANE_EXTENSION, REFUSED, Expiry,
                                     LinkConnection, send_timeout)
from wpk.runtime.tensors import TensorError
from wpk.runtime.infer_messages import (PIPELINE_PARAM, build_request, parse_response,
                                        payload_bytes)

FALLBACK_RETRY_S = 30.0
CONNECT_TIMEOUT_S = 2.0
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SEND_TIMEOUT_S = 10.0       # a send blocked this long (the next tier stopped reading) fails
DISCOVER_TIMEOUT_S = 10.0   # ServerMetadata's wait when the request has no deadline

Done = Callable[[object], None]
LINKS = ("tcp", "grpc")   # wpk-serve --link; "grpc" (streams, removed) now means "tcp",
# with a warning (gRPC between tiers is what TLS tiers use, whatever --link says)


def link_kind(link: str, tls: bool) -> str:
    """The transport a tier uses to its next tier for `wpk-serve --link LINK`: gRPC with TLS
    (the tensor link is plain TCP), else the tensor link; "grpc" (gRPC streams between tiers,
    removed: the tensor link was measured 2-3x faster per hop) warns once."""
    refuse_unknown_choice(link, LINKS, "link")
    if tls:
        return "grpc"
    if link == "grpc":
        warnings.warn("--link grpc: gRPC streams between tiers were removed; using the "
                      "tensor link (--link tcp)", stacklevel=2)
    return "tcp"


class NextTier(Protocol):
    """The next tier, over some transport."""

    kind: str   # "tcp" (the tensor link) or "grpc" (TLS)

    async def forward(self, model: str, arrays: Mapping[str, np.ndarray],
                      timeout: float | None, pipeline: bool = True) -> dict[str, np.ndarray]:
        """On the tier's loop: the answer's arrays (pipeline=False: as ModelInfer answers)."""

    def submit(self, model: str, arrays: Mapping[str, np.ndarray], timeout: float | None,
               done: Done) -> None:
        """From any thread; `done(outcome)` gets the arrays or a TierError, from some thread.
        (Only where the tier serves the tensor link, whose requests arrive on threads: the
        tensor link's own `TcpLink`.)"""

    async def close(self) -> None: ...


def _outcome(future) -> object:
    """A finished concurrent future as an outcome: its result, or a TierError."""
    if future.cancelled():
        return TierError(grpc.StatusCode.CANCELLED, "cancelled")
    error = future.exception()
    if error is None:
        return future.result()
    if isinstance(error, TierError):
        return error
    return TierError(grpc.StatusCode.INTERNAL, repr(error))


def _run_on(loop: asyncio.AbstractEventLoop, coroutine, done: Done) -> None:
    """Run `coroutine` on `loop` (from any thread); `done` gets its outcome on the loop."""
    future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    future.add_done_callback(lambda f: done(_outcome(f)))


def _settle(future: asyncio.Future, outcome: object) -> None:
    if future.done():
        return
    if isinstance(outcome, TierError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class GrpcLink:
    """The next tier over ModelInfer calls (requests carry `wpk_pipeline`) of `client`, an
    InferenceClient (not imported here: it uses this module)."""

    kind = "grpc"

    def __init__(self, client, codec: Codec, metrics: TierMetrics,
                 loop: asyncio.AbstractEventLoop):
        self.client = client
        self.encoder = Encoder(codec) if codec != Codec() else None  # used on the loop only
        self.metrics = metrics
        self.loop = loop

    async def forward(self, model: str, arrays: Mapping[str, np.ndarray],
                      timeout: float | None, pipeline: bool = True) -> dict[str, np.ndarray]:
        request = build_request(model, arrays, encoder=self.encoder,
                                parameters={PIPELINE_PARAM: True} if pipeline else None)
        self.metrics.add_bytes("forward", request.nbytes)
        response = await self.client.infer_message(request, timeout=timeout)
        self.metrics.add_bytes("return", payload_bytes(response))
        try:
            return parse_response(response)
        except TensorError as error:
            raise TierError(grpc.StatusCode.INTERNAL, f"bad answer: {error}") from None

    async def close(self) -> None:
        await self.client.close()


class TcpLink:
    """The next tier over the tensor link, falling back to `grpc` where there is none.

    One connection, read by a thread of its own: `submit()` from a connection's thread
    (requests from the previous tier's tensor link, or a client's) sends at once; `forward()`
    from the loop gets its answer back through `call_soon_threadsafe`."""

    kind = "tcp"

    def __init__(self, address: str, grpc_link: GrpcLink, codec: Codec, metrics: TierMetrics):
        self.host = address.rsplit(":", 1)[0].strip("[]")
        self.grpc = grpc_link
        self.loop = grpc_link.loop
        self.codec = codec
        self.metrics = metrics
        self.expiry = Expiry()
        self.connection: LinkConnection | None = None   # made on first use
        self.port: int | None = None           # the next tier's tensor-link port, once known
        self.lanes = False                     # ... and whether it maps shared-memory lanes
        self._dialled_remembered: LinkConnection | None = None  # made on a port known before
        self.fallback_until = 0.0              # monotonic time until which gRPC is used
        self._connecting = asyncio.Lock()
        self._recheck: asyncio.Task | None = None  # looking for the tensor link again
        self._local = threading.local()        # one Encoder per thread (zstd contexts)
        self._raw = codec == Codec()

    # -- sending ----------------------------------------------------------------------------
    def _encoder(self) -> Encoder | None:
        if self._raw:
            return None
        encoder = getattr(self._local, "encoder", None)
        if encoder is None:
            encoder = self._local.encoder = Encoder(self.codec)
        return encoder

    def _send(self, connection: LinkConnection, model: str, arrays: Mapping[str, np.ndarray],
              timeout: float | None, done: Done, pipeline: bool = True) -> None:
        def parts_for(request_id: int) -> list:
            parts = encode(REQUEST, request_id, arrays, model=model,
                           timeout_ms=-1.0 if timeout is None else timeout * 1000.0,
                           encoder=self._encoder(), kserve=not pipeline)
            self.metrics.add_bytes("forward", sum(memoryview(p).nbytes for p in parts[1:]))
            return parts

        def done_or_again(outcome) -> None:
            if isinstance(outcome, TierError) and connection.error is outcome \
                    and not connection.answered and outcome.code in (REFUSED, UNAVAILABLE):
                # a new connection refused (too many open) or closed before it answered
                # anything: send the request again, over gRPC for a while (inference has no
                # side effects; a tier that is down gives UNAVAILABLE there too)
                self._refused(connection)
                _run_on(self.loop, self.grpc.forward(model, arrays, timeout, pipeline), done)
                return
            done(outcome)

        try:
            connection.send(parts_for, timeout, done_or_again)
        except TensorError as error:  # a dtype the protocol cannot name
            done(TierError(grpc.StatusCode.INTERNAL, str(error)))

    def _refused(self, connection: LinkConnection) -> None:
        """The next tier refused `connection` or closed it before any answer. From any
        thread; the link's state changes on the loop, between its awaits."""
        try:
            self.loop.call_soon_threadsafe(self._after_refusal, connection)
        except RuntimeError:  # the loop is closed: nothing left to connect
            pass

    def _after_refusal(self, connection: LinkConnection) -> None:
        """gRPC for a while; but a connection dialled on the port remembered from before
        that closed unanswered only forgets that port: a restarted tier listens elsewhere
        and another process (or the dying one's backlog) may have taken the old one, so the
        next request asks for the port again. A refusal (too many connections) comes from
        the right port: gRPC for a while."""
        if self.connection is not connection:
            return
        self.connection = None
        error = connection.error
        if connection is self._dialled_remembered and error is not None \
                and error.code == UNAVAILABLE:
            self.port = None
            return
        print(f"wpk: tensor link {self.host}:{self.port} ended a new connection before "
              f"answering ({error.details if error else 'closed'}); using gRPC, trying again "
              f"every {FALLBACK_RETRY_S:.0f} s", file=sys.stderr, flush=True)
        self.fallback_until = time.monotonic() + FALLBACK_RETRY_S

    def _open(self) -> LinkConnection | None:
        connection = self.connection
        return connection if connection is not None and connection.error is None else None

    async def forward(self, model: str, arrays: Mapping[str, np.ndarray],
                      timeout: float | None, pipeline: bool = True) -> dict[str, np.ndarray]:
        """On the loop; the answer's arrays, or raises TierError. A frame that could hold up
        the loop (a large payload that no lane takes: a network's pace) leaves from a worker
        thread instead."""
        connection = self._open() or await self._connect(timeout)
        if connection is None:
            return await self.grpc.forward(model, arrays, timeout, pipeline)
        loop = self.loop
        future = loop.create_future()
        done = lambda outcome: loop.call_soon_threadsafe(_settle, future, outcome)  # noqa
        lane = connection.lane
        if sum(a.nbytes for a in arrays.values()) > LANE_MIN_BYTES and \
                not (lane is not None and lane.ready):
            await loop.run_in_executor(None, self._send, connection, model, arrays, timeout,
                                       done, pipeline)
        else:
            self._send(connection, model, arrays, timeout, done, pipeline)
        return await future

    def submit(self, model: str, arrays: Mapping[str, np.ndarray], timeout: float | None,
               done: Done) -> None:
        connection = self._open()
        if connection is not None:  # the hot path: no loop involved
            self._send(connection, model, arrays, timeout, done)
            return
        # no open connection: connect on the loop (this answer then passes it)
        _run_on(self.loop, self.forward(model, arrays, timeout), done)

    # -- connecting -------------------------------------------------------------------------
    async def _connect(self, timeout: float | None) -> LinkConnection | None:
        """The open connection, a new one, or None: use gRPC. Raises TierError when the
        next tier cannot be asked where its tensor link is (down: UNAVAILABLE; too slow:
        DEADLINE_EXCEEDED)."""
        if self.fallback_until:  # on gRPC: look again now and then, off the request path
            if time.monotonic() >= self.fallback_until and self._recheck is None:
                self._recheck = asyncio.ensure_future(self._retry())
            return None
        started = time.monotonic()
        try:   # another request may be connecting: wait for it within this one's deadline
            await asyncio.wait_for(self._connecting.acquire(), timeout)
        except asyncio.TimeoutError:
            raise TierError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"deadline exceeded connecting to {self.host}") from None
        try:
            connection = self._open()
            if connection is not None or self.fallback_until:
                return connection
            left = None if timeout is None else max(timeout - (time.monotonic() - started),
                                                    0.001)
            return await self._attempt(left)
        finally:
            self._connecting.release()

    async def _attempt(self, timeout: float | None) -> LinkConnection | None:
        """Dial the known port, or ask for it first (it changes when the tier restarts)."""
        sock = await self._dial(self.port, timeout) if self.port is not None else None
        remembered = sock is not None
        if sock is None:
            self.port = await self._discover(timeout)
            if self.port is None:  # not a wpk tier, or one run with TLS
                return self._fall_back()
            sock = await self._dial(self.port, timeout)
            if sock is None:
                print(f"wpk: tensor link {self.host}:{self.port} unreachable; using gRPC, "
                      f"trying again every {FALLBACK_RETRY_S:.0f} s", file=sys.stderr,
                      flush=True)
                return self._fall_back()
        count = lambda n: self.metrics.add_bytes("return", n)  # noqa: E731
        self.connection = LinkConnection(sock, self.expiry, count,
                                         self.lanes and over_loopback(sock))
        self._dialled_remembered = self.connection if remembered else None
        self.fallback_until = 0.0
        return self.connection

    def _fall_back(self) -> None:
        """Use gRPC for FALLBACK_RETRY_S; then `_retry` dials again."""
        self.fallback_until = time.monotonic() + FALLBACK_RETRY_S

    async def _retry(self) -> None:
        try:
            async with self._connecting:
                try:
                    await self._attempt(CONNECT_TIMEOUT_S)
                except TierError:  # not answering now: stay on gRPC a while longer
                    self.fallback_until = time.monotonic() + FALLBACK_RETRY_S
        finally:
            self._recheck = None

    async def _discover(self, timeout: float | None) -> int | None:
        try:   # bounded even without a deadline: it holds up every request connecting
            response = await self.grpc.client.stub.ServerMetadata(
                pb.ServerMetadataRequest(),
                timeout=DISCOVER_TIMEOUT_S if timeout is None else timeout)
        except grpc.aio.AioRpcError as error:
            raise TierError(error.code(), error.details() or "no answer") from None
        self.lanes = LANE_EXTENSION in response.extensions
        for extension in response.extensions:
            if extension.startswith(EXTENSION_PREFIX):
                try:
                    return int(extension[len(EXTENSION_PREFIX):])
                except ValueError:
                    return None
        return None

    async def _dial(self, port: int, timeout: float | None) -> socket.socket | None:
        """A connected socket, or None (refused, or no answer within CONNECT_TIMEOUT_S or the
        request's own time, whichever is shorter)."""
        wait = CONNECT_TIMEOUT_S if timeout is None else min(CONNECT_TIMEOUT_S,
                                                             max(timeout, 0.05))

        def connect() -> socket.socket | None:
            try:
                sock = socket.create_connection((self.host, port), timeout=wait)
            except OSError:
                return None
            sock.settimeout(None)
            send_timeout(sock, SEND_TIMEOUT_S)
            return sock

        return await self.loop.run_in_executor(None, connect)

    async def close(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
        self.expiry.close()
        if self.connection is not None:
            self.connection.close()
        await self.grpc.close()
