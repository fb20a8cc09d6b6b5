"""Dynamic batching at a tier (`wpk-serve --max-batch`): throughput of a CNN slice served by
one tier, fed by simulated devices, with and without batching, measured side by side.

The plan cuts wpk's resnet_like example after its first layers on the device; the rest is
the cloud tier's slice, which one `wpk-serve` serves without batching and another (same
thread settings) with `--max-batch N --max-queue-delay-us D`. Eight simulated devices (one
gRPC channel each, the KServe v2 client) keep 32 requests in flight between them, each a
batch of one, against one server at a time; the servers take turns round by round, and the
table gives the median requests per second over the rounds and the ratio.

    python benchmarks/runtime_batching.py [--devices 8] [--in-flight 32] [--max-batch 16]
        [--max-queue-delay-us 2000] [--rounds 5] [--seconds 3] [--image 64]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from rich.table import Table

from wpk.console import make_console
from wpk.examples import resnet_like
from wpk.partitioner.api import partition
from wpk.plan import load_plan
from wpk.runtime.client import InferenceClient
from wpk.runtime.server import READY_MARK

TIERS = Path(__file__).resolve().parent.parent / "examples" / "one-machine.yaml"


def make_plan(directory: Path, image: int) -> Path:
    """resnet_like with its stem on the device and everything after it on the cloud."""
    model = resnet_like(image_size=image)
    path = directory / "resnet_like.onnx"
    onnx.save(model, str(path))
    nodes = [n.name for n in model.graph.node]
    pins = {name: "device" for name in nodes[:4]} | {name: "cloud" for name in nodes[4:]}
    partition(path, tiers_file=TIERS, objective="throughput", pins=pins, out_dir=directory,
              use_calibration=False)
    return directory


def start_server(plan_dir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "wpk.runtime.server", str(plan_dir),
                                "--tier", "cloud", "--port", "0", *extra],
                               stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if READY_MARK in line:
            return process, line.split(READY_MARK)[1].split()[0]
    raise SystemExit(f"runtime_batching: wpk-serve {' '.join(extra)} did not start")


async def load(address: str, model: str, feeds: dict[str, np.ndarray], devices: int,
               in_flight: int, seconds: float) -> float:
    """Requests per second: `devices` channels, `in_flight` requests open between them."""
    clients = [InferenceClient(address) for _ in range(devices)]
    done = 0
    stop_at = time.monotonic() + seconds

    async def device_loop(client: InferenceClient) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            await client.infer(model, feeds)
            done += 1

    for client in clients:        # connect and warm up outside the window
        await client.infer(model, feeds)
    started = time.monotonic()
    stop_at = started + seconds
    await asyncio.gather(*(device_loop(clients[i % devices]) for i in range(in_flight)))
    elapsed = time.monotonic() - started
    for client in clients:
        await client.close()
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--image", type=int, default=64)
    args = parser.parse_args()
    console = make_console()
    plan_dir = make_plan(Path(tempfile.mkdtemp(prefix="wpk-batching-")), args.image)
    plan = load_plan(plan_dir)
    cloud = plan.tier("cloud")
    feeds = {name: np.random.default_rng(0).standard_normal(plan.tensors[name].shape)
             .astype(plan.tensors[name].dtype) for name in cloud.inputs}
    model = f"{plan.name}.cloud"
    batched_args = ["--max-batch", str(args.max_batch), "--max-queue-delay-us",
                    str(args.max_queue_delay_us)]
    servers = {"unbatched": start_server(plan_dir, []),
               f"--max-batch {args.max_batch}": start_server(plan_dir, batched_args)}
    rates: dict[str, list[float]] = {key: [] for key in servers}
    try:
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
            for key in order:
                rate = asyncio.run(load(servers[key][1], model, feeds, args.devices,
                                        args.in_flight, args.seconds))
                rates[key].append(rate)
                console.print(f"round {round_ + 1}: {key}: {rate:.0f} req/s")
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(10)
    baseline = statistics.median(rates["unbatched"])
    table = Table(title=f"cloud slice of resnet_like ({args.image}x{args.image}), "
                        f"{args.devices} devices, {args.in_flight} in flight")
    for col in ("server", "req/s (median of rounds)", "rounds", "vs unbatched"):
        table.add_column(col)
    for key, values in rates.items():
        median = statistics.median(values)
        table.add_row(key, f"{median:.0f}", " ".join(f"{v:.0f}" for v in values),
                      f"{median / baseline:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
