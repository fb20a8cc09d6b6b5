"""`wpk-deploy PLAN --local --mqtt HOST:PORT` runs the bridge next to the tiers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from wpk.plan import load_plan

from .helpers import Client, check_results, free_port, json_input


def test_deploy_local_with_mqtt_bridge(broker, plan_dir, reference):
    model = load_plan(plan_dir).name
    deploy = subprocess.Popen(
        [sys.executable, "-m", "wpk.deploy.cli", str(plan_dir), "--local", "--port",
         str(free_port()), "--threads", "1", "--no-metrics", "--mqtt", broker.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"})
    client = Client(broker.port, "t-deploy", [f"wpk/{model}/+/result"])
    try:
        # The bridge subscribes once it is up: publish until the first answer comes back.
        deadline = time.monotonic() + 30
        while not client.messages and time.monotonic() < deadline:
            assert deploy.poll() is None, deploy.communicate()
            client.publish(f"wpk/{model}/press4/input", json_input(0))
            time.sleep(0.3)
        for i in range(1, 10):
            client.publish(f"wpk/{model}/press4/input", json_input(i), wait=False)
        client.wait_for(lambda ms: {json.loads(m.payload)["id"] for m in ms} >= set(range(10)))
        assert {m.topic for m in client.messages} == {f"wpk/{model}/press4/result"}
        check_results(client.json_messages(), range(10), reference)
    finally:
        client.close()
        deploy.send_signal(signal.SIGINT)
        out, err = deploy.communicate(timeout=20)
    assert deploy.returncode == 0, err
    assert "MQTT bridge: broker" in out and "bridge stopped" in err
