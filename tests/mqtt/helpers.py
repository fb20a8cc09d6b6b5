"""Real processes for the bridge tests: Mosquitto, a wpk deployment, the bridge, MQTT clients."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from wpk.bridge.broker import MOSQUITTO, Mosquitto, free_port  # noqa: F401
from wpk.bridge.link import no_delay


FEATURES = 64  # input width of the test model (an `mlp` example)


def features(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(FEATURES).astype(np.float32)


def json_input(i: int) -> bytes:
    return json.dumps({"inputs": {"features": features(i).tolist()}, "id": i}).encode()


def check_results(results: list[dict], ids, reference) -> None:
    """Every id has a result (duplicates allowed: at-least-once) equal to ORT's."""
    by_id = {}
    for r in results:
        by_id.setdefault(r["id"], r)
    assert set(by_id) == set(ids), f"missing {sorted(set(ids) - set(by_id))[:10]}"
    for i in ids:
        (output,) = by_id[i]["outputs"].values()
        np.testing.assert_allclose(np.asarray(output, dtype=np.float32),
                                   reference(features(i)), rtol=1e-5, atol=1e-6)


class Deployment:
    """A real plan's tiers as `wpk-serve` processes (wpk.deploy.local), killable and
    restartable on the same entry port."""

    def __init__(self, plan_dir: Path, serve_args: list[str] = ()):
        from wpk.plan import load_plan

        self.serve_args = list(serve_args)
        self.plan_dir = plan_dir
        self.model = load_plan(plan_dir).name
        self.port = free_port()
        self.local = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Deployment":
        from wpk.deploy.local import LocalDeployment

        self.local = LocalDeployment(self.plan_dir, port=self.port, threads=1, metrics=False,
                                     serve_args=self.serve_args)
        self.local.start()
        return self

    def kill(self) -> None:
        """SIGKILL every tier: no goodbye, in-flight requests die with them."""
        if self.local is not None:
            for handle in self.local.tiers:
                handle.process.kill()
            self.local.stop(grace=2.0)
        self.local = None


class BridgeThread:
    """A Bridge running on its own asyncio loop in a thread (stats readable from the test)."""

    def __init__(self, config):
        from wpk.bridge.bridge import Bridge
        from wpk.bridge.pipeline import KServePipeline

        self.config = config
        self.loop = asyncio.new_event_loop()
        self.bridge = None
        self._created = threading.Event()
        self.error: BaseException | None = None

        def run():
            asyncio.set_event_loop(self.loop)

            async def main():
                self.bridge = Bridge(config, KServePipeline.from_config(config, timeout_s=5.0))
                self._created.set()
                await self.bridge.run()
            try:
                self.loop.run_until_complete(main())
            except BaseException as error:  # surfaced by stop()
                self.error = error
                self._created.set()

        self.thread = threading.Thread(target=run, daemon=True)

    def start(self, timeout_s: float = 10.0) -> "BridgeThread":
        self.thread.start()
        self._created.wait(timeout_s)
        if self.error:
            raise self.error
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(self.bridge.ready.wait(),
                                                                timeout_s), self.loop)
        fut.result(timeout_s + 1)
        return self

    @property
    def stats(self):
        return self.bridge.stats

    def stop(self) -> None:
        if self.bridge is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.bridge.stop)
        self.thread.join(timeout=15)
        if self.error:
            raise self.error


class Client:
    """A test-side MQTT v5 client: persistent session, collects what arrives on its topics."""

    def __init__(self, port: int, client_id: str, topics: list[str] = (),
                 username: str | None = None, password: str | None = None, qos: int = 1):
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 1)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(200)
        self.topics, self.qos = list(topics), qos
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_socket_open = no_delay
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, 30, clean_start=False, properties=properties)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise TimeoutError("test client could not connect")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if self.topics:
            client.subscribe([(t, SubscribeOptions(qos=self.qos)) for t in self.topics])
        self.connected.set()

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append(message)
            self.lock.notify_all()

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None,
                wait: bool = True):
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        if wait:
            info.wait_for_publish(10)
        return info

    def wait_for(self, predicate, timeout_s: float = 10.0) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"got {len(self.messages)} messages")
                self.lock.wait(left)
            return list(self.messages)

    def wait_count(self, n: int, timeout_s: float = 10.0, topic_prefix: str = ""):
        return self.wait_for(
            lambda ms: sum(m.topic.startswith(topic_prefix) for m in ms) >= n, timeout_s)

    def json_messages(self, topic_prefix: str = "") -> list[dict]:
        with self.lock:
            return [json.loads(m.payload) for m in self.messages
                    if m.topic.startswith(topic_prefix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def idempotency_keys(messages) -> list[str]:
    """Each result's wpk-idempotency-key user property."""
    return [dict(m.properties.UserProperty)["wpk-idempotency-key"] for m in messages]
