"""Fault drills: break a running deployment under load and count what happens to every request.

    python benchmarks/fault_drills.py [--rate 100] [--seconds 8] [--messages 2000]
                                      [--drills tier,broker,bridge]

- tier: `wpk-deploy --local`'s supervisor (LocalDeployment.revive, as the CLI runs it) with a
  client sending `--rate` requests/s (deadline 2 s each); the edge tier is killed (SIGKILL)
  a quarter of the way in. Counted: sent, answered, failed (by status, and whether the error
  names the tier), lost (no answer at all), and the recovery time: from the kill to the first
  answer after it.
- broker / bridge: Mosquitto, the local deployment and a `wpk-bridge` process; `--messages`
  JSON inputs published at QoS 1; the broker is restarted (persisted sessions), or the bridge
  killed (SIGKILL) and a successor started with the same client id, a quarter of the way in.
  Counted: sent, results, distinct inputs answered, lost, duplicated (results whose
  wpk-idempotency-key was seen before), and the recovery time: the longest silence between
  two results from the fault on, as a consumer sees the outage.
Every drill stops by itself; all traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.mqtt_throughput import make_plan  # noqa: E402
from wpk.console import make_console  # noqa: E402
from wpk.deploy.local import LocalDeployment  # noqa: E402
from wpk.bridge.broker import Mosquitto, free_port  # noqa: E402

console = make_console()


class Supervised:
    """A local deployment with its supervisor running, as `wpk-deploy --local` runs it."""

    def __init__(self, plan_dir: Path):
        self.deployment = LocalDeployment(plan_dir, port=free_port(), threads=1, metrics=False)
        self.events: list[tuple[float, str]] = []
        self.stopping = threading.Event()

    def __enter__(self) -> "Supervised":
        self.deployment.start()
        self.thread = threading.Thread(target=self._supervise, daemon=True)
        self.thread.start()
        return self

    def _supervise(self) -> None:
        while not self.stopping.wait(0.2):
            self.deployment.revive(lambda line: self.events.append((time.monotonic(), line)))

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()
        self.deployment.stop()


def tier_drill(plan_dir: Path, rate: float, seconds: float) -> dict:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    with Supervised(plan_dir) as supervised:
        deployment = supervised.deployment
        plan = deployment.plan
        shape = list(plan.model.inputs[0].shape)
        name = plan.model.inputs[0].name
        x = triton.InferInput(name, shape, "FP32")
        x.set_data_from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        client = triton.InferenceServerClient(deployment.entry)
        outcomes: list[tuple[float, str, str]] = []   # (sent at, status, message)
        lock = threading.Lock()
        pending = [0]

        def answered(result, error, sent_at: float) -> None:
            status = "OK" if error is None else str(error.status()).replace("StatusCode.", "")
            with lock:
                outcomes.append((sent_at, status, "" if error is None else error.message()))
                pending[0] -= 1

        start = time.monotonic()
        kill_at = start + seconds / 4
        killed_at = None
        n = int(rate * seconds)
        for i in range(n):
            due = start + i / rate
            time.sleep(max(0.0, due - time.monotonic()))
            if killed_at is None and time.monotonic() >= kill_at:
                os.kill(deployment.tiers[1].process.pid, signal.SIGKILL)
                killed_at = time.monotonic()
            sent_at = time.monotonic()
            with lock:
                pending[0] += 1
            try:
                client.async_infer(plan.name, [x], partial(answered, sent_at=sent_at),
                                   client_timeout=2.0)
            except InferenceServerException as error:
                answered(None, error, sent_at)
        deadline = time.monotonic() + 10
        while pending[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        client.close()
        events = list(supervised.events)
    statuses = Counter(status for _, status, _ in outcomes)
    failed = [o for o in outcomes if o[1] != "OK"]
    recovered = min((t for t, status, _ in outcomes if status == "OK" and t > killed_at
                     and any(f[0] > killed_at and f[0] < t for f in failed)), default=None)
    return {"drill": "edge tier killed (wpk-deploy --local)", "sent": n,
            "answered": statuses["OK"], "failed": len(failed),
            "failed naming the tier": sum("tier 'edge'" in m for _, _, m in failed),
            "by status": dict(statuses), "lost": pending[0],
            "recovery_s": None if recovered is None else round(recovered - killed_at, 2),
            "supervisor": [line for _, line in events]}


class Results:
    """Subscribes to the results: counts them, distinct inputs and repeated keys."""

    def __init__(self, port: int, topic: str):
        self.times: list[float] = []
        self.keys: Counter = Counter()
        self.ids: set[int] = set()
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="drill-results",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(
            [(topic, SubscribeOptions(qos=1))])
        self.client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port, 30, clean_start=False, properties=properties)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        document = json.loads(message.payload)
        with self.lock:
            self.ids.add(document["id"])
            if document["id"] != -1:   # not a warm-up
                self.times.append(time.monotonic())
                self.keys[document["key"]] += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def start_bridge(broker: Mosquitto, entry: str, model: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "wpk.bridge.cli", "--broker", broker.address,
         "--pipeline", entry, "--model", model, "--client-id", "drill-bridge",
         "--subscribe", "drill/+/in", "--format", "json", "--publish", "drill/{1}/out",
         "--queue-size", "5000"], stderr=subprocess.DEVNULL)


def mqtt_drill(plan_dir: Path, workdir: Path, fault: str, messages: int) -> dict:
    broker = Mosquitto(workdir / f"broker-{fault}").start()
    with Supervised(plan_dir) as supervised:
        entry, plan = supervised.deployment.entry, supervised.deployment.plan
        shape = list(plan.model.inputs[0].shape)
        name = plan.model.inputs[0].name
        bridge = start_bridge(broker, entry, plan.name)
        results = Results(broker.port, "drill/+/out")
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="drill-sensor",
                                protocol=mqtt.MQTTv5)
        publisher.reconnect_delay_set(1, 1)
        publisher.max_inflight_messages_set(1000)
        publisher.max_queued_messages_set(0)
        publisher.connect("127.0.0.1", broker.port, 30)
        publisher.loop_start()
        rng = np.random.default_rng(1)
        try:
            warm = json.dumps({"id": -1, "inputs": {name: rng.standard_normal(shape).tolist()}})
            deadline = time.monotonic() + 60
            while -1 not in results.ids and time.monotonic() < deadline:  # bridge subscribed
                publisher.publish("drill/line1/in", warm, qos=1)
                time.sleep(0.5)
            fault_at = None
            for i in range(messages):
                if i == messages // 4:
                    fault_at = time.monotonic()
                    if fault == "broker":
                        broker.restart()
                    else:
                        bridge.send_signal(signal.SIGKILL)
                        bridge.wait()
                        bridge = start_bridge(broker, entry, plan.name)
                payload = json.dumps({"id": i, "inputs": {
                    name: rng.standard_normal(shape).tolist()}})
                publisher.publish("drill/line1/in", payload, qos=1)
                time.sleep(0.002)
            deadline = time.monotonic() + 60
            while len(results.ids - {-1}) < messages and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)   # repeats still on their way
        finally:
            publisher.loop_stop()
            results.close()
            bridge.terminate()
            bridge.wait(10)
            broker.stop()
    answered = results.ids - {-1}
    # what a consumer sees: the longest silence between two results from the fault on
    times = sorted(t for t in results.times if t > fault_at - 1.0)
    gaps = [b - a for a, b in zip(times, times[1:]) if b > fault_at]
    return {"drill": f"{'broker restarted' if fault == 'broker' else 'bridge killed'} "
                     "mid-stream", "sent": messages,
            "results": sum(results.keys.values()),
            "answered": len(answered), "lost": messages - len(answered),
            "duplicated": sum(n - 1 for n in results.keys.values() if n > 1),
            "recovery_s": round(max(gaps), 2) if gaps else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s (tier drill)")
    parser.add_argument("--seconds", type=float, default=8.0, help="tier drill length")
    parser.add_argument("--messages", type=int, default=2000, help="MQTT inputs per drill")
    parser.add_argument("--drills", default="tier,broker,bridge")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="wpk-drills-") as tmp:
        workdir = Path(tmp)
        plan_dir = make_plan("mlp", workdir)
        drills = args.drills.split(",")
        if "tier" in drills:
            rows.append(tier_drill(plan_dir, args.rate, args.seconds))
        for fault in ("broker", "bridge"):
            if fault in drills:
                rows.append(mqtt_drill(plan_dir, workdir, fault, args.messages))
    table = Table(title="fault drills (mlp, 3 tiers on this machine)")
    for column in ("drill", "sent", "answered", "failed", "lost", "duplicated", "recovery s"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["drill"], str(row["sent"]), str(row["answered"]),
                      str(row.get("failed", "-")), str(row["lost"]),
                      str(row.get("duplicated", "-")), str(row["recovery_s"]))
    console.print(table)
    for row in rows:
        if "by status" in row:
            console.print(f"{row['drill']}: {row['by status']}; "
                          f"{row['failed naming the tier']} of {row['failed']} failures name the "
                          f"tier; supervisor: {' | '.join(row['supervisor'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(row["lost"] == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
