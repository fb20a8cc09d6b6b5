"""The bridge against a real Mosquitto broker and a real KServe v2 server (ONNX Runtime)."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from conftest import FEATURES, MODEL_NAME
from helpers import BridgeThread, Client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from wpk.runtime.bridge.config import BridgeConfig, BrokerConfig, Route
from wpk.runtime.bridge.sparkplug import make_metric, make_payload


def make_config(broker, pipeline, routes, **kwargs) -> BridgeConfig:
    return BridgeConfig(broker=BrokerConfig(port=broker.port, client_id="bridge-under-test",
                                            reconnect_min_s=1, reconnect_max_s=1),
                        pipeline=pipeline.address, routes=routes, **kwargs)


def features(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(FEATURES).astype(np.float32)


def json_input(i: int) -> bytes:
    return json.dumps({"inputs": {"features": features(i).tolist()}, "id": i}).encode()


def check_results(results: list[dict], ids, reference) -> None:
    by_id = {}
    for r in results:
        by_id.setdefault(r["id"], r)
    assert set(by_id) == set(ids), f"missing {sorted(set(ids) - set(by_id))[:10]}"
    for i in ids:
        got = np.asarray(by_id[i]["outputs"]["softmax_12_out"]
                         if "softmax_12_out" in by_id[i]["outputs"]
                         else next(iter(by_id[i]["outputs"].values())), dtype=np.float32)
        np.testing.assert_allclose(got, reference(features(i)), rtol=1e-5, atol=1e-6)


def test_json_inputs_n_in_n_out_in_order(broker, pipeline, reference):
    route = Route("plant/+/camera", "plant/{1}/inference", format="json", model=MODEL_NAME)
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
        assert all(r["latency_ms"] >= 0 and r["model"] == MODEL_NAME for r in results)
        assert bridge.stats.results == n and bridge.stats.errors == 0
    finally:
        client.close()
        bridge.stop()
