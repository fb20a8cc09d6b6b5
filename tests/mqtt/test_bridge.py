"""The bridge against a real Mosquitto broker and a real 3-tier wpk pipeline (wpk-serve
processes of a wpk-partition plan); results checked against ONNX Runtime on the whole model."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from wpk.bridge.config import BridgeConfig, BrokerConfig, Route
from wpk.bridge.sparkplug import make_metric, make_payload

from wpk.bridge.bridge import idempotency_key

from .helpers import (FEATURES, BridgeThread, Client, check_results, features,
                      idempotency_keys, json_input)


def make_config(broker, pipeline, routes, **kwargs) -> BridgeConfig:
    return BridgeConfig(broker=BrokerConfig(port=broker.port, client_id="bridge-under-test",
                                            reconnect_min_s=1, reconnect_max_s=1),
                        pipeline=pipeline.address, routes=routes, **kwargs)


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class Stream(threading.Thread):
    """Publishes json_input(0..n-1) on `topic`, one every `period_s`, in the background.
    It holds after `hold_after` messages until `resume` is set, so that what a test breaks
    "mid-stream" is mid-stream on a machine of any speed."""

    def __init__(self, client: Client, topic: str, n: int, period_s: float = 0.01,
                 hold_after: int = 40):
        super().__init__(daemon=True)
        self.client, self.topic, self.n, self.period_s = client, topic, n, period_s
        self.hold_after, self.resume = hold_after, threading.Event()
        self.sent = 0

    def run(self) -> None:
        for i in range(self.n):
            if i == self.hold_after:
                self.resume.wait(60)
            self.client.publish(self.topic, json_input(i), wait=False)
            self.sent += 1
            time.sleep(self.period_s)


def test_json_inputs_n_in_n_out_in_order(broker, pipeline, reference):
    route = Route("plant/+/camera", "plant/{1}/inference", format="json", model=pipeline.model)
    bridge = BridgeThread(make_config(broker, pipeline, [route])).start()
    client = Client(broker.port, "t-json", ["plant/+/inference"])
    try:
        n = 60
        for i in range(n):
            client.publish(f"plant/line{i % 2}/camera", json_input(i), wait=False)
        client.wait_count(n)
        results = client.json_messages()
        assert len(results) == n
        check_results(results, range(n), reference)
        for line in (0, 1):  # order per source topic, sequence ids 0, 1, 2, ...
            mine = [r for r in results if r["topic"] == f"plant/line{line}/camera"]
            assert [r["id"] for r in mine] == list(range(line, n, 2))
            assert [r["seq"] for r in mine] == list(range(n // 2))
        assert {m.topic for m in client.messages} == {"plant/line0/inference",
                                                      "plant/line1/inference"}
        assert all(r["latency_ms"] >= 0 and r["model"] == pipeline.model for r in results)
        # the idempotency key: in the user property and the document, from topic and bytes
        keys = idempotency_keys(client.messages)
        assert keys == [r["key"] for r in results] and len(set(keys)) == n
        assert {(r["topic"], r["id"], r["key"]) for r in results} == {
            (f"plant/line{i % 2}/camera", i,
             idempotency_key(f"plant/line{i % 2}/camera", json_input(i))) for i in range(n)}
        wait_until(lambda: bridge.stats.results == n)   # counted on the broker's PUBACK
        assert bridge.stats.errors == 0
    finally:
        client.close()
        bridge.stop()


def test_results_at_qos_2_reach_the_broker_exactly_once(broker, pipeline, reference):
    route = Route("qos2/in", "qos2/out", format="json", model=pipeline.model)
    bridge = BridgeThread(make_config(broker, pipeline, [route], result_qos=2)).start()
    client = Client(broker.port, "t-qos2", ["qos2/out"], qos=2)
    try:
        n = 30
        for i in range(n):
            client.publish("qos2/in", json_input(i), wait=False)
        client.wait_count(n)
        check_results(client.json_messages(), range(n), reference)
        assert {m.qos for m in client.messages} == {2}
        wait_until(lambda: bridge.stats.results == n)   # counted on the broker's PUBCOMP
    finally:
        client.close()
        bridge.stop()


def test_raw_npy_and_sparkplug_routes_in_one_bridge(broker, pipeline, reference):
    """Several subscriptions, each with its own format and result format."""
    model = pipeline.model
    routes = [
        Route("raw/+/in", "raw/{1}/out", format="raw", model=model, result="raw"),
        Route("npy/+/in", "npy/{1}/out", format="npy", model=model, result="npy"),
        Route("spBv1.0/plant/+/edge1/+", "sp/{4}/out", format="sparkplug", model=model,
              metrics=["vib", "temp"]),
    ]
    bridge = BridgeThread(make_config(broker, pipeline, routes)).start()
    client = Client(broker.port, "t-formats", ["raw/+/out", "npy/+/out", "sp/+/out",
                                                "replies/me"])
    try:
        for i in range(5):
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = f"req-{i}".encode()
            client.publish("raw/a/in", features(i).astype("<f4").tobytes(), props, wait=False)
            buffer = io.BytesIO()
            np.save(buffer, features(100 + i).reshape(1, FEATURES))
            client.publish("npy/b/in", buffer.getvalue(), wait=False)
        # Sparkplug: BIRTH binds names to aliases; DATA reports by exception, by alias only.
        vib = features(200)[:FEATURES - 1]
        client.publish("spBv1.0/plant/DBIRTH/edge1/pump7", make_payload(
            [make_metric("vib", vib, alias=1), make_metric("temp", np.float32(0.5), alias=2),
             make_metric("label", "pump seven", alias=3)], seq=0))
        client.publish("spBv1.0/plant/DDATA/edge1/pump7", make_payload(
            [make_metric(None, np.float32(-1.25), alias=2)], seq=1,
            timestamp_ms=int(time.time() * 1e3)))
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "replies/me"  # MQTT v5 request/response: answered there
        client.publish("raw/a/in", features(9).astype("<f4").tobytes(), props)
        client.wait_count(12)
        (reply,) = [m for m in client.messages if m.topic == "replies/me"]
        np.testing.assert_allclose(np.frombuffer(reply.payload, "<f4"),
                                   reference(features(9)).ravel(), rtol=1e-5, atol=1e-6)
        raw = [m for m in client.messages if m.topic == "raw/a/out"]
        assert [m.properties.CorrelationData for m in raw] == [f"req-{i}".encode()
                                                                for i in range(5)]
        assert ("seq", "4") in raw[4].properties.UserProperty  # raw results: metadata here
        for i, m in enumerate(raw):
            np.testing.assert_allclose(np.frombuffer(m.payload, "<f4"),
                                       reference(features(i)).ravel(), rtol=1e-5, atol=1e-6)
        npy = [m for m in client.messages if m.topic == "npy/b/out"]
        for i, m in enumerate(npy):
            np.testing.assert_allclose(np.load(io.BytesIO(m.payload)),
                                       reference(features(100 + i)), rtol=1e-5, atol=1e-6)
        (sp,) = [json.loads(m.payload) for m in client.messages if m.topic == "sp/pump7/out"]
        expected = reference(np.concatenate([vib, [-1.25]]).astype(np.float32))
        (output,) = sp["outputs"].values()
        np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-6)
        assert sp["sparkplug_seq"] == 1 and sp["latency_from"] == "source"
        assert bridge.stats.errors == 0
    finally:
        client.close()
        bridge.stop()


def test_malformed_payloads_go_to_error_topic_and_bridge_stays_up(broker, pipeline, reference):
    model = pipeline.model
    routes = [Route("j/in", "j/out", format="json", model=model),
              Route("r/in", "r/out", format="raw", model=model),
              Route("n/in", "n/out", format="npy", model=model),
              Route("spBv1.0/g/+/e", "s/out", format="sparkplug", model=model),
              Route("x/in", "x/out", format="json", model="no_such_model")]
    bridge = BridgeThread(make_config(broker, pipeline, routes, error_topic="errors")).start()
    client = Client(broker.port, "t-bad", ["errors", "j/out"])
    bad = [("j/in", b"{not json", "invalid JSON"),
           ("j/in", b'{"x": 1}', '"inputs"'),
           ("j/in", json.dumps({"inputs": {"features": [1.0, 2.0]}}).encode(), "does not fit"),
           ("j/in", json.dumps({"inputs": {"nope": [0.0] * FEATURES}}).encode(), "nope"),
           ("j/in", json.dumps({"inputs": {"features": ["a"] * FEATURES}}).encode(),
            "array of numbers"),
           ("r/in", b"\x00\x01\x02", "not a whole number"), ("r/in", b"", "empty"),
           ("n/in", b"\x93NUMPY garbage", "not a .npy"),
           ("spBv1.0/g/NDATA/e", b"\xff\xff\xff", "not a Sparkplug B payload"),
           ("spBv1.0/g/NDATA/e", make_payload([make_metric("x", 1.0)]), "before its BIRTH"),
           ("x/in", json_input(1), "NOT_FOUND")]
    try:
        for topic, payload, _ in bad:
            client.publish(topic, payload, wait=False)
        client.publish("j/in", json_input(7))
        client.wait_count(len(bad), topic_prefix="errors")
        client.wait_count(1, topic_prefix="j/out")
        errors = client.json_messages("errors")
        assert len(errors) == len(bad)
        for topic, _, reason in bad:  # decode errors come at once, shape errors after metadata
            assert any(e["topic"] == topic and reason in e["reason"] for e in errors), reason
        check_results(client.json_messages("j/out"), [7], reference)
        assert bridge.stats.errors == len(bad) and bridge.thread.is_alive()
    finally:
        client.close()
        bridge.stop()


@pytest.mark.parametrize("transport", ["unary", "stream", "tensor-link"])
def test_pipeline_killed_and_restarted_mid_stream_loses_nothing(broker, own_pipeline,
                                                                reference, transport):
    own_pipeline.start()
    route = Route("plant/+/camera", "plant/{1}/inference", format="json",
                  model=own_pipeline.model)
    bridge = BridgeThread(make_config(
        broker, own_pipeline, [route], pipeline_stream=transport == "stream",
        pipeline_tensor_link=transport == "tensor-link")).start()
    client = Client(broker.port, "t-kill", ["plant/+/inference"])
    try:
        n = 120
        stream = Stream(client, "plant/l1/camera", n)
        stream.start()
        client.wait_count(20)
        own_pipeline.kill()                        # all three tiers, SIGKILL, mid-stream
        stream.resume.set()
        wait_until(lambda: bridge.stats.pipeline_outages >= 1)
        assert bridge.stats.pipeline_outages == 1 and stream.sent < n
        own_pipeline.start()
        stream.join()
        client.wait_count(n, timeout_s=10)
        results = client.json_messages()
        check_results(results, range(n), reference)
        assert [r["id"] for r in results] == list(range(n))  # one topic: order kept
        assert bridge.stats.errors == 0 and bridge.stats.dropped == 0
        assert bridge.stats.retries > 0
        if transport != "unary":   # back on the restarted entry tier's tensor link ("stream"
            # names the removed gRPC streams: it means the tensor link)
            assert bridge.bridge.pipeline.client.transport == "tcp"
    finally:
        client.close()
        bridge.stop()


def test_broker_restarted_mid_stream_bridge_reconnects_and_loses_nothing(
        broker, pipeline, reference):
    route = Route("plant/+/camera", "plant/{1}/inference", format="json", model=pipeline.model)
    bridge = BridgeThread(make_config(broker, pipeline, [route])).start()
    client = Client(broker.port, "t-restart", ["plant/+/inference"])
    try:
        n = 120
        stream = Stream(client, "plant/l1/camera", n)
        stream.start()
        client.wait_count(20)
        broker.restart()                           # persisted sessions and QoS 1 queues
        assert stream.sent < n
        stream.resume.set()
        stream.join()
        client.wait_for(lambda ms: {json.loads(m.payload)["id"] for m in ms} >= set(range(n)),
                        timeout_s=10)
        check_results(client.json_messages(), range(n), reference)  # at least once, correct
        assert bridge.stats.reconnects >= 1 and bridge.stats.errors == 0
        # a result published again for a redelivered input carries the same key
        key_of: dict[int, set[str]] = {}
        for result, key in zip(client.json_messages(), idempotency_keys(client.messages)):
            key_of.setdefault(result["id"], set()).add(key)
        assert all(len(keys) == 1 for keys in key_of.values())
    finally:
        client.close()
        bridge.stop()


def test_block_policy_leaves_the_backlog_with_the_broker(broker, own_pipeline, reference):
    """Queue of 5, pipeline away: the bridge holds at most 5, the broker keeps the other 25."""
    route = Route("q/in", "q/out", format="json", model=own_pipeline.model)
    bridge = BridgeThread(make_config(broker, own_pipeline, [route], queue_size=5)).start()
    client = Client(broker.port, "t-block", ["q/out"])
    try:
        for i in range(30):
            client.publish("q/in", json_input(i), wait=False)
        wait_until(lambda: bridge.stats.received >= 5)
        time.sleep(0.3)   # time for more to arrive, were the bridge to take them
        assert bridge.stats.received == 5 and bridge.stats.held_peak == 5
        own_pipeline.start()
        client.wait_count(30)
        results = client.json_messages()
        check_results(results, range(30), reference)
        assert [r["id"] for r in results] == list(range(30))
        assert bridge.stats.dropped == 0
    finally:
        client.close()
        bridge.stop()


def test_drop_oldest_policy_counts_and_reports_drops(broker, own_pipeline, reference):
    route = Route("q/in", "q/out", format="json", model=own_pipeline.model)
    bridge = BridgeThread(make_config(broker, own_pipeline, [route], queue_size=5,
                                      queue_policy="drop-oldest", error_topic="err")).start()
    client = Client(broker.port, "t-drop", ["q/out", "err"])
    try:
        for i in range(30):
            client.publish("q/in", json_input(i), wait=False)
        client.wait_count(25, topic_prefix="err")
        assert bridge.stats.dropped == 25
        assert all("dropped" in e["reason"] for e in client.json_messages("err"))
        own_pipeline.start()
        client.wait_count(5, topic_prefix="q/out")
        results = client.json_messages("q/out")
        assert [r["id"] for r in results] == list(range(25, 30))  # the newest five
        check_results(results, range(25, 30), reference)
    finally:
        client.close()
        bridge.stop()


def start_cli_bridge(broker, pipeline, client_id: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "wpk.bridge.cli", "--broker", broker.address,
         "--pipeline", pipeline.address, "--model", pipeline.model, "--client-id", client_id,
         "--subscribe", "plant/+/camera", "--format", "json",
         "--publish", "plant/{1}/inference"], stderr=subprocess.PIPE, text=True)


def test_bridge_killed_mid_stream_successor_with_same_client_id_loses_nothing(
        broker, pipeline, reference):
    """Inputs are acknowledged only after their result is out: a SIGKILLed bridge leaves the
    rest in its persistent session, and the next bridge process gets them."""
    client = Client(broker.port, "t-crash", ["plant/+/inference"])
    bridge = start_cli_bridge(broker, pipeline, "bridge-crash")
    try:
        deadline = time.monotonic() + 20  # the bridge subscribes once it is up
        while not client.messages and time.monotonic() < deadline:
            client.publish("plant/warm/camera", json.dumps(
                {"inputs": {"features": features(0).tolist()}, "id": -1}).encode())
            time.sleep(0.2)
        n = 120
        stream = Stream(client, "plant/l1/camera", n)
        stream.start()
        client.wait_count(20, topic_prefix="plant/l1/")
        bridge.kill()
        bridge.wait()
        assert stream.sent < n
        stream.resume.set()
        bridge = start_cli_bridge(broker, pipeline, "bridge-crash")
        stream.join()
        client.wait_for(lambda ms: {json.loads(m.payload)["id"] for m in ms
                                    if m.topic == "plant/l1/inference"} >= set(range(n)))
        check_results([r for r in client.json_messages("plant/l1/")], range(n), reference)
    finally:
        client.close()
        bridge.terminate()
        _, err = bridge.communicate(timeout=15)
    assert "session resumed" in err and bridge.returncode == 0
