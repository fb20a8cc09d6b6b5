"""The bridge: MQTT inputs -> decode -> pipeline inference -> results on MQTT.

Delivery: an input is acknowledged to the broker (manual PUBACK, in arrival order as MQTT
requires) only once its result, or its error report, has been published and acknowledged. While
the pipeline is away inputs wait here, retried with backoff, up to `queue_size`; beyond that
`block` leaves the rest with the broker (MQTT v5 Receive Maximum = queue_size, so the broker
stops sending) and `drop-oldest` gives up the oldest waiting input (counted, logged, reported).
A lost broker connection abandons the unacknowledged inputs: the broker has them in the
persistent session and delivers them again after the reconnect (at-least-once).

Ordering: inputs of one source topic are inferred concurrently but published in arrival order.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import MAX_RECEIVE, BridgeConfig, Route
from .formats import InputFormat, Parsed, PayloadError, encode_result, make_input_format
from .link import MqttLink
from .pipeline import InferenceRejected, Pipeline, PipelineUnavailable
from .topics import TopicTemplate, matches

log = logging.getLogger("wpk.bridge")


@dataclass
class Stats:
    received: int = 0
    results: int = 0
    errors: int = 0
    dropped: int = 0
    retries: int = 0
    held_peak: int = 0
    pipeline_outages: int = 0
    reconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _RouteState:
    def __init__(self, route: Route):
        self.route = route
        self.format: InputFormat = make_input_format(route.format, input_name=route.input,
                                                     metrics=route.metrics)
        self.template = TopicTemplate(route.publish)
        self.seq: collections.Counter[str] = collections.Counter()
        self.tails: dict[str, asyncio.Future] = {}  # source topic -> last input's `done`


# The user property every result carries: the same input, delivered again after a broker or
# bridge restart (QoS 1 is at least once), gives a result with the same key.
IDEMPOTENCY_PROPERTY = "wpk-idempotency-key"


def idempotency_key(topic: str, payload: bytes) -> str:
    """A digest of the input's topic and bytes: stable across redeliveries and restarts. Two
    inputs with the same bytes on one topic share it; their results are the same too."""
    return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=16).hexdigest()


@dataclass(eq=False)
class _Held:
    """One input between its arrival and its acknowledgement."""

    mid: int
    epoch: int
    topic: str
    received_at: float
    properties: Any
    done: asyncio.Future
    finished: bool = False
    task: asyncio.Task | None = None
    started: bool = False
    dropped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Bridge:
    def __init__(self, config: BridgeConfig, pipeline: Pipeline):
        config.check()
        self.config = config
        self.pipeline = pipeline
        self.routes = [_RouteState(r) for r in config.routes]
        self.stats = Stats()
        self.epoch = 0
        self._ack_order: collections.deque[_Held] = collections.deque()
        self._waiting: dict[_Held, None] = {}  # not yet inferred, in arrival order
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self._pipeline_up = True
        self._signatures: dict[str, Any] = {}
        self._stopping = asyncio.Event()
        self.link: MqttLink | None = None
        self.ready = asyncio.Event()

    # ---- lifecycle ----
    async def run(self) -> None:
        """Run until `stop()`; then wait briefly for work in progress and disconnect."""
        loop = asyncio.get_running_loop()
        receive = self.config.queue_size if self.config.queue_policy == "block" else MAX_RECEIVE
        self.link = MqttLink(self.config.broker, [r.route.subscribe for r in self.routes],
                             receive, loop, self._on_message, self._on_connected,
                             self._on_disconnected)
        self.link.start()
        stats_task = asyncio.create_task(self._log_stats())
        try:
            await self._stopping.wait()
            await self._drain(timeout_s=5.0)
        finally:
            stats_task.cancel()
            await self.link.stop()
            await self.pipeline.close()
            log.info("bridge stopped: %s", self.stats.as_dict())

    def stop(self) -> None:
        self._stopping.set()

    async def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._ack_order and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _log_stats(self) -> None:
        last: dict[str, int] = {}
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            now = self.stats.as_dict()
            if now != last:
                log.info("stats: %s, held now %d", now, len(self._ack_order))
                last = now

    # ---- connection events (loop thread, in network order) ----
    def _on_connected(self, session_present: bool) -> None:
        self.ready.set()

    def _on_disconnected(self, reason: str) -> None:
        """Unacknowledged inputs stay in the broker's session: forget ours, they come again."""
        self.epoch += 1
        if not self.link.stopping:
            self.stats.reconnects += 1
        for held in self._ack_order:
            if held.task is not None:
                held.task.cancel()
        self._ack_order.clear()
        self._waiting.clear()
        for state in self.routes:
            state.tails.clear()

    # ---- input path ----
    def _route_for(self, topic: str) -> _RouteState | None:
        for state in self.routes:
            if matches(state.route.subscribe, topic):
                return state
        return None

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        held = _Held(message.mid, self.epoch, message.topic, time.time(),
                     getattr(message, "properties", None),
                     asyncio.get_running_loop().create_future())
        self._ack_order.append(held)
        self.stats.received += 1
        state = self._route_for(message.topic)
        if state is None:  # a retained/overlapping delivery no route claims
            self._finish(held)
            return
        try:
            parsed = state.format.parse(message.topic, message.payload)
        except PayloadError as error:
            held.task = asyncio.create_task(self._reject(held, state, str(error)))
            return
        except Exception as error:  # never leave an input unacknowledged behind a bug
            log.exception("%s: unexpected error while decoding", message.topic)
            held.task = asyncio.create_task(self._reject(
                held, state, f"internal error: {type(error).__name__}: {error}"))
            return
        if not parsed.infer:
            self._finish(held)
            return
        held.extra["key"] = idempotency_key(message.topic, message.payload)
        held.extra["seq"] = state.seq[message.topic]
        state.seq[message.topic] += 1
        previous = state.tails.get(message.topic)
        state.tails[message.topic] = held.done
        self._waiting[held] = None
        held.task = asyncio.create_task(self._process(held, state, parsed, previous))
        self._enforce_capacity()

    def _enforce_capacity(self) -> None:
        held_now = len(self._waiting)
        self.stats.held_peak = max(self.stats.held_peak, held_now)
        if held_now <= self.config.queue_size:
            return
        if self.config.queue_policy == "drop-oldest":
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.dropped = True
            if oldest.started:  # a task cancelled before its first step would skip `finally`
                oldest.task.cancel()
            self.stats.dropped += 1
            if self.stats.dropped == 1 or self.stats.dropped % 100 == 0:
                log.warning("queue full (%d): dropped the oldest input from %s (%d dropped so "
                            "far)", self.config.queue_size, oldest.topic, self.stats.dropped)
        elif held_now == self.config.queue_size + 1:
            log.warning("queue over its size (%d) although the broker should hold back: "
                        "still holding", self.config.queue_size)

    async def _process(self, held: _Held, state: _RouteState, parsed: Parsed,
                       previous: asyncio.Future | None) -> None:
        route = state.route
        held.started = True
        try:
            if held.dropped:
                raise asyncio.CancelledError
            signature = self._signatures.get(route.model)
            if signature is None:
                signature = await self._retrying(lambda: self.pipeline.signature(route.model))
                self._signatures[route.model] = signature
            inputs = state.format.to_inputs(parsed, signature)
            async with self._slots:
                outputs = await self._retrying(lambda: self.pipeline.infer(route.model, inputs))
            self._waiting.pop(held, None)
            if previous is not None:
                await asyncio.shield(previous)
            await self._publish_result(held, state, parsed, outputs)
            self.stats.results += 1
        except (PayloadError, InferenceRejected, ValueError) as error:
            self._waiting.pop(held, None)
            await self._report(held, state, str(error))
        except Exception as error:  # a bug or a surprise from a library: report, keep going
            log.exception("%s: unexpected error", held.topic)
            self._waiting.pop(held, None)
            await self._report(held, state, f"internal error: {type(error).__name__}: {error}")
        except asyncio.CancelledError:
            if held.dropped:
                await self._report(held, state, "dropped: queue full while the pipeline was "
                                   "slow or unreachable (policy drop-oldest)", count=False)
            else:
                raise
        finally:
            if previous is not None and not previous.done() and held.epoch == self.epoch:
                await asyncio.shield(previous)
            self._finish(held)

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        delay = 0.05
        while True:
            try:
                result = await call()
            except PipelineUnavailable as error:
                self.stats.retries += 1
                if self._pipeline_up:
                    self._pipeline_up = False
                    self.stats.pipeline_outages += 1
                    log.warning("pipeline unreachable (%s): holding inputs, retrying", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max_s)
                continue
            if not self._pipeline_up:
                self._pipeline_up = True
                log.info("pipeline back: %d inputs held", len(self._waiting))
            return result

    async def _publish_result(self, held: _Held, state: _RouteState, parsed: Parsed,
                              outputs: dict) -> None:
        route = state.route
        properties = Properties(PacketTypes.PUBLISH)
        topic = state.template.render(held.topic)
        incoming = held.properties
        if incoming is not None:  # MQTT v5 request/response: answer where asked
            if getattr(incoming, "ResponseTopic", None):
                topic = incoming.ResponseTopic
            if getattr(incoming, "CorrelationData", None):
                properties.CorrelationData = incoming.CorrelationData
            source_ts = _user_property(incoming, "timestamp")
            if parsed.source_timestamp_ms is None and source_ts is not None:
                parsed.source_timestamp_ms = source_ts
        now = time.time()
        origin = parsed.source_timestamp_ms
        latency_ms = now * 1e3 - origin if origin is not None else (now - held.received_at) * 1e3
        meta = {"topic": held.topic, "seq": held.extra["seq"], "key": held.extra["key"],
                "model": route.model,
                "latency_ms": round(latency_ms, 3),
                "latency_from": "source" if origin is not None else "bridge",
                "received_at_ms": round(held.received_at * 1e3, 3), **parsed.echo}
        payload = encode_result(route.result, outputs, meta, route.output)
        # the key on every result (JSON has it inside too): consumers drop duplicates by it
        properties.UserProperty = [(IDEMPOTENCY_PROPERTY, meta["key"])]
        if route.result != "json":  # JSON carries these itself; packing properties costs
            properties.UserProperty += [("source_topic", held.topic), ("seq", str(meta["seq"])),
                                        ("latency_ms", str(meta["latency_ms"]))]
        await self.link.publish(topic, payload, properties, qos=self.config.result_qos)

    async def _reject(self, held: _Held, state: _RouteState, reason: str) -> None:
        try:
            await self._report(held, state, reason)
        finally:
            self._finish(held)

    async def _report(self, held: _Held, state: _RouteState, reason: str,
                      count: bool = True) -> None:
        """Publish one line on the error topic; the input is then acknowledged and skipped."""
        if count:
            self.stats.errors += 1
        log.warning("%s: %s", held.topic, reason)
        document = {"topic": held.topic, "format": state.route.format, "model": state.route.model,
                    "reason": reason, "received_at_ms": round(held.received_at * 1e3, 3)}
        await self.link.publish(self.config.errors_to, json.dumps(document).encode())

    def _finish(self, held: _Held) -> None:
        held.finished = True
        if not held.done.done():
            held.done.set_result(None)
        self._waiting.pop(held, None)
        while self._ack_order and self._ack_order[0].finished:
            head = self._ack_order.popleft()
            if head.epoch == self.epoch:
                self.link.ack(head.mid)


def _user_property(properties: Any, key: str) -> float | None:
    for name, value in getattr(properties, "UserProperty", None) or []:
        if name == key:
            try:
                return float(value)
            except ValueError:
                return None
    return None
