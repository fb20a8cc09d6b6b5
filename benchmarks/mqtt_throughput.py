"""MQTT ingestion throughput and latency: broker + wpk-bridge + 3-tier pipeline, next to the
same pipeline called directly, in one run.

    python benchmarks/mqtt_throughput.py [--model mlp] [--messages 2000] [--in-flight 8]

Starts Mosquitto (config from wpk.bridge.broker), partitions an example model into a
device/edge/cloud plan with wpk-partition (pins put work on every tier), deploys it locally
(wpk-serve processes), and runs `wpk-bridge` as its own process. Measured:
- pipeline alone: KServe v2 gRPC calls from InferenceClient (or, with --tensor-link, frames
  over the entry tier's tensor link from LinkClient), one at a time (latency) and with
  `--in-flight` concurrent calls (throughput);
- through MQTT: raw tensors published at QoS 1, JSON results received at QoS 1; one at a time
  (end-to-end latency: publish -> result received), paced at half the pipeline's burst
  throughput (latency under load), and as a burst (throughput).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from rich.table import Table

from wpk.console import make_console
from wpk.deploy.local import LocalDeployment
from wpk.examples import EXAMPLES
from wpk.partitioner.cli import main as partition_main
from wpk.plan import load_plan
from wpk.bridge.broker import Mosquitto, free_port
from wpk.bridge.link import no_delay
from wpk.runtime.client import InferenceClient
from wpk.runtime.link_client import LinkClient

console = make_console()
PACED_FRACTION = 0.5  # paced phases send at this fraction of the pipeline's burst throughput


def make_plan(model_name: str, workdir: Path) -> Path:
    model = EXAMPLES[model_name]()
    path = workdir / f"{model_name}.onnx"
    onnx.save(model, str(path))
    nodes = [n.name for n in model.graph.node]
    pins = {"device": nodes[0], "edge": nodes[len(nodes) // 2], "cloud": nodes[-1]}
    args = [str(path), "-o", str(workdir / "plan"), "--no-calibrate", "--deliver-to", "cloud"]
    for tier, node in pins.items():
        args += ["--pin", f"{node}={tier}"]
    with contextlib.redirect_stdout(io.StringIO()):
        if partition_main(args) != 0:
            raise SystemExit("wpk-partition failed")
    return workdir / "plan"


def stats(latencies_s: list[float], elapsed_s: float) -> tuple[float, float, float]:
    ms = np.asarray(latencies_s) * 1e3
    return len(ms) / elapsed_s, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def median_of(rounds: list[dict[str, tuple]]) -> dict[str, tuple]:
    return {mode: tuple(float(np.median([r[mode][k] for r in rounds])) for k in range(3))
            for mode in rounds[0]}


async def pipeline_alone(address: str, model: str, inputs: list[np.ndarray], name: str,
                         in_flight: int, rate: float | None, transport: str = "unary"
                         ) -> dict[str, tuple]:
    """One round of the three phases; `rate` None: pace at PACED_FRACTION of this round's
    burst throughput. `transport`: unary (InferenceClient) or tensor-link (LinkClient)."""
    client = LinkClient(address, timeout=30) if transport == "tensor-link" else \
        InferenceClient(address, timeout=30)
    async with client:
        for x in inputs[:20]:
            await client.infer(model, {name: x})
        latencies = []
        start = time.perf_counter()
        for x in inputs[:len(inputs) // 4]:
            t0 = time.perf_counter()
            await client.infer(model, {name: x})
            latencies.append(time.perf_counter() - t0)
        sequential = stats(latencies, time.perf_counter() - start)

        latencies = []
        queue = iter(inputs)

        async def worker():
            for x in queue:
                t0 = time.perf_counter()
                await client.infer(model, {name: x})
                latencies.append(time.perf_counter() - t0)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        concurrent = stats(latencies, time.perf_counter() - start)

        rate = rate or PACED_FRACTION * concurrent[0]
        latencies = []

        async def one(x):
            t0 = time.perf_counter()
            await client.infer(model, {name: x})
            latencies.append(time.perf_counter() - t0)
        tasks = []
        start = time.perf_counter()
        for i, x in enumerate(inputs[:len(inputs) // 2]):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(x)))
        await asyncio.gather(*tasks)
        paced = stats(latencies, time.perf_counter() - start)
    return {"sequential": sequential, "concurrent": concurrent, "paced": paced}


class MqttLoad:
    """Publishes raw tensors, receives JSON results; matches them by (topic, seq)."""

    def __init__(self, port: int):
        self.sent: dict[tuple[str, int], float] = {}
        self.latencies: dict[str, list[float]] = {}
        self.done = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="wpk-bench-load",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.on_message = self._on_message
        self.client.on_socket_open = no_delay
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect("127.0.0.1", port, 30, clean_start=True)
        self.client.loop_start()
        connected.wait(10)
        self.client.subscribe("bench/+/out", options=SubscribeOptions(qos=1))

    def _on_message(self, client, userdata, message):
        now = time.perf_counter()
        result = json.loads(message.payload)
        phase = result["topic"].split("/")[1]
        with self.done:
            sent = self.sent.get((phase, result["seq"]), now)
            self.latencies.setdefault(phase, []).append(now - sent)
            self.done.notify_all()

    def wait(self, phase: str, n: int, timeout_s: float = 300) -> None:
        with self.done:
            if not self.done.wait_for(lambda: len(self.latencies.get(phase, [])) >= n,
                                      timeout_s):
                raise SystemExit(f"{phase}: only {len(self.latencies.get(phase, []))}/{n} "
                                 "results arrived")

    def publish(self, phase: str, seq: int, payload: bytes) -> None:
        with self.done:
            self.sent[(phase, seq)] = time.perf_counter()
        self.client.publish(f"bench/{phase}/in", payload, qos=1)

    def warm_up(self, payload: bytes) -> None:
        # The bridge subscribes when it connects: repeat until its first result comes back.
        deadline = time.monotonic() + 30
        while not self.latencies.get("warm"):
            if time.monotonic() > deadline:
                raise SystemExit("the bridge did not answer within 30 s")
            self.publish("warm", -1, payload)
            time.sleep(0.2)
        for _ in range(20):
            self.publish("warm", -1, payload)
        self.wait("warm", 21)

    def measure(self, round_: int, inputs: list[np.ndarray], rate: float) -> dict[str, tuple]:
        payloads = [x.astype("<f4").tobytes() for x in inputs]
        phase = f"seq{round_}"
        start = time.perf_counter()
        for i, p in enumerate(payloads[:len(payloads) // 4]):
            self.publish(phase, i, p)
            self.wait(phase, i + 1)
        result = {"sequential": stats(self.latencies[phase], time.perf_counter() - start)}
        phase = f"burst{round_}"
        start = time.perf_counter()
        for i, p in enumerate(payloads):
            self.publish(phase, i, p)
        self.wait(phase, len(payloads))
        result["concurrent"] = stats(self.latencies[phase], time.perf_counter() - start)
        phase = f"paced{round_}"
        paced = payloads[:len(payloads) // 2]
        start = time.perf_counter()
        for i, p in enumerate(paced):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            self.publish(phase, i, p)
        self.wait(phase, len(paced))
        result["paced"] = stats(self.latencies[phase], time.perf_counter() - start)
        return result

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=sorted(EXAMPLES))
    parser.add_argument("--messages", type=int, default=2000, help="burst size (sequential "
                        "phases use a quarter)")
    parser.add_argument("--stream", action="store_true",
                        help="an earlier name for --tensor-link (gRPC streams were removed "
                        "from wpk's client)")
    parser.add_argument("--tensor-link", action="store_true",
                        help="bridge and direct client enter over the entry tier's tensor "
                        "link (wpk-bridge --tensor-link, LinkClient)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (pipeline alone, then MQTT); medians shown")
    parser.add_argument("--in-flight", type=int, default=8,
                        help="concurrent pipeline requests (bridge --max-in-flight)")
    args = parser.parse_args(argv)
    if args.stream:
        console.print("warning: --stream: gRPC streams were removed from wpk's client; "
                      "measuring --tensor-link")
        args.tensor_link = True
    transport = "tensor-link" if args.tensor_link else "unary"

    with tempfile.TemporaryDirectory(prefix="wpk-mqtt-bench-") as tmp:
        workdir = Path(tmp)
        plan_dir = make_plan(args.model, workdir)
        plan = load_plan(plan_dir)
        source = onnx.load(str(workdir / f"{args.model}.onnx"))
        graph_input = source.graph.input[0]
        shape = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(args.messages)]

        broker = Mosquitto(workdir / "broker").start()
        deployment = LocalDeployment(plan_dir, port=free_port(), threads=1, metrics=False)
        bridge = None
        load = None
        loop = asyncio.new_event_loop()   # one loop for every round: grpc.aio channels do not
        try:                              # survive the loop switches of repeated asyncio.run
            deployment.start()
            entry = deployment.entry
            console.print(f"{plan.name}: {len(plan.tiers)} tiers "
                          f"({', '.join(t.name for t in plan.tiers)}), entry {entry}, "
                          f"input {graph_input.name} {shape} "
                          f"({inputs[0].nbytes} B), broker {broker.address}")
            first = loop.run_until_complete(pipeline_alone(
                entry, plan.name, inputs, graph_input.name, args.in_flight, None, transport))
            rate = PACED_FRACTION * first["concurrent"][0]
            bridge = subprocess.Popen(
                [sys.executable, "-m", "wpk.bridge.cli", "--broker", broker.address,
                 "--pipeline", entry, "--model", plan.name, "--client-id", "wpk-bench-bridge",
                 "--subscribe", "bench/+/in", "--format", "raw", "--publish", "bench/{1}/out",
                 "--result", "json", "--max-in-flight", str(args.in_flight),
                 "--queue-size", str(max(args.messages, 100))]
                + (["--tensor-link"] if args.tensor_link else []),
                stderr=subprocess.DEVNULL)
            load = MqttLoad(broker.port)
            load.warm_up(inputs[0].astype("<f4").tobytes())
            alone_rounds, mqtt_rounds = [], []
            for round_ in range(args.rounds):  # interleaved: both paths see the same noise
                alone_rounds.append(loop.run_until_complete(pipeline_alone(
                    entry, plan.name, inputs, graph_input.name, args.in_flight, rate,
                    transport)))
                mqtt_rounds.append(load.measure(round_, inputs, rate))
            alone, through = median_of(alone_rounds), median_of(mqtt_rounds)
        finally:
            if load:
                load.close()
            if bridge:
                bridge.terminate()
                bridge.wait(10)
            deployment.stop()
            broker.stop()
            loop.close()

    table = Table(title=f"{args.model}: {args.messages} messages, {args.in_flight} in flight, "
                        f"{transport}, median of "
                        f"{args.rounds} interleaved rounds")
    for column in ("path", "mode", "msgs/s", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for path, results in ((f"pipeline alone ({transport})", alone),
                          ("MQTT: broker+bridge+pipeline", through)):
        for mode, label in (("sequential", "one at a time"),
                            ("paced", f"paced at {rate:,.0f}/s"),
                            ("concurrent", f"burst, {args.in_flight} in flight")):
            throughput, p50, p99 = results[mode]
            table.add_row(path, label, f"{throughput:,.0f}", f"{p50:.2f}", f"{p99:.2f}")
    console.print(table)
    ratio = through["concurrent"][0] / alone["concurrent"][0]
    overhead = through["sequential"][1] - alone["sequential"][1]
    console.print(f"MQTT path / pipeline alone: throughput {ratio:.2f}x; one at a time p50 "
                  f"{through['sequential'][1] / alone['sequential'][1]:.2f}x "
                  f"(+{overhead:.2f} ms for broker + bridge: two QoS 1 hops); paced p99 "
                  f"{through['paced'][2] / alone['paced'][2]:.2f}x. Burst latencies include "
                  "queueing behind the whole burst.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
