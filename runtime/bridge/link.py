"""paho-mqtt 2.x client in its own thread, handing events to an asyncio loop.

The bridge acknowledges inputs itself (`manual_ack`), only after their result is published
and acknowledged by the broker: a bridge that dies or loses its connection leaves the inputs
unacknowledged in its persistent session and the broker delivers them again.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .config import BrokerConfig

log = logging.getLogger("wpk.bridge.mqtt")


def no_delay(client, userdata, sock) -> None:
    """Disable Nagle's algorithm: paho leaves it on, and small QoS 1 messages then wait for
    the peer's delayed ACK (~40 ms) before leaving."""
    if hasattr(sock, "setsockopt") and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttLink:
    """One MQTT v5 connection: persistent session, QoS 1, automatic reconnect with backoff."""

    def __init__(self, config: BrokerConfig, subscriptions: list[str], receive_maximum: int,
                 loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[mqtt.MQTTMessage], None],
                 on_connected: Callable[[bool], None],
                 on_disconnected: Callable[[str], None]):
        self.config = config
        self.subscriptions = subscriptions
        self.loop = loop
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._pubacks: dict[int, asyncio.Future] = {}
        self.connected = asyncio.Event()
        self.stopping = False

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls or config.tls_ca or config.tls_cert:
            client.tls_set(ca_certs=config.tls_ca, certfile=config.tls_cert,
                           keyfile=config.tls_key, cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(config.tls_insecure)
        client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
        client.max_inflight_messages_set(64)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_socket_open = no_delay
        client.on_connect_fail = self._handle_connect_fail
        self._last_fail_log = 0.0
        self.client = client
        self.connect_properties = Properties(PacketTypes.CONNECT)
        self.connect_properties.SessionExpiryInterval = config.session_expiry_s
        self.connect_properties.ReceiveMaximum = receive_maximum

    # --- lifecycle (asyncio thread) ---
    def start(self) -> None:
        self.client.connect_async(self.config.host, self.config.port, self.config.keepalive_s,
                                  clean_start=False, properties=self.connect_properties)
        self.client.loop_start()

    def stop(self) -> None:
        self.stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    # --- network thread -> loop ---
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.config.host,
                      self.config.port, reason_code)
            return
        options = SubscribeOptions(qos=1)
        client.subscribe([(topic, options) for topic in self.subscriptions])
        self.loop.call_soon_threadsafe(self._connected, bool(flags.session_present))

    def _handle_connect_fail(self, client, userdata) -> None:
        now = time.monotonic()
        if now - self._last_fail_log > 30:  # say it once per 30 s of trying, not per attempt
            self._last_fail_log = now
            log.warning("cannot reach the broker at %s:%d; retrying (backoff up to %d s)",
                        self.config.host, self.config.port, self.config.reconnect_max_s)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.loop.call_soon_threadsafe(self._disconnected, str(reason_code))

    def _handle_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        self.loop.call_soon_threadsafe(self._on_message, message)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.loop.call_soon_threadsafe(self._published, mid, reason_code)

    # --- loop thread ---
    def _connected(self, session_present: bool) -> None:
        log.info("connected to %s:%d as %r (session %s)", self.config.host, self.config.port,
                 self.config.client_id, "resumed" if session_present else "new")
        self.connected.set()
        self._on_connected(session_present)

    def _disconnected(self, reason: str) -> None:
        if self.connected.is_set() and not self.stopping:
            log.warning("disconnected from %s:%d (%s); reconnecting", self.config.host,
                        self.config.port, reason)
        self.connected.clear()
        # paho re-sends unacknowledged publishes itself; our waiters belong to cancelled work.
        for future in self._pubacks.values():
            if not future.done():
                future.cancel()
        self._pubacks.clear()
        self._on_disconnected(reason)

    def _published(self, mid: int, reason_code) -> None:
        future = self._pubacks.pop(mid, None)
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            log.error("broker rejected a publish (mid %d): %s", mid, reason_code)
        if future is not None and not future.done():
            future.set_result(None)

    async def publish(self, topic: str, payload: bytes,
                      properties: Properties | None = None) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        # on_publish reaches us through call_soon_threadsafe, so it cannot run before this
        # registration: the loop is busy with us until the await below.
        future = self.loop.create_future()
        if info.is_published():
            return
        self._pubacks[info.mid] = future
        await future

    def ack(self, mid: int) -> None:
        self.client.ack(mid, 1)
