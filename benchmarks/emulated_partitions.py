"""Measured latency of the chosen plan vs. all-on-device and all-on-cloud, on an emulated network.

For each example model and bandwidths from 1 Mbit/s to 1 Gbit/s (both links; RTT 5 ms
device-edge, 20 ms edge-cloud), every plan runs in network namespaces joined by shaped links
(`wpk.deploy.emulate`), and requests are timed end to end through the real tier servers.

So that plans are made for the hardware they run on, the device tier is an emulated slow
board: its server is held to `--device-cpu` of one core by a cgroup quota (default 0.1: 10x
slower than this machine's core), and the partitioner plans with node times profiled here
(1 thread; the device's profiled under the same quota). Edge and cloud run at this machine's
speed (the cloud cannot be emulated faster than the CPU we have), so chosen plans put work on
the device and the edge. All-on-cloud ships the raw input (the privacy default forbids it; it
is the baseline to beat). Needs root.

    sudo python benchmarks/emulated_partitions.py [--models mlp,resnet_like] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
from rich.table import Table

from wpk import examples
from wpk.console import make_console
from wpk.deploy.cpulimit import CpuLimit
from wpk.deploy.emulate import Emulation, emulated_links
from wpk.graph import Graph
from wpk.partitioner.api import partition
from wpk.partitioner.costs import measured_costs
from wpk.plan import load_plan
from wpk.profile_format import Profile, load_profile
from wpk.profiling import profile_model

BANDWIDTHS_MBPS = [1, 10, 100, 1000]
RTT_MS = {"device-edge": 5.0, "edge-cloud": 20.0}
MAX_PREDICTED_MS = 12000.0      # do not time points predicted slower than this
MODELS = {"mlp": examples.mlp, "mobilenet_like": examples.mobilenet_like,
          "resnet_like": examples.resnet_like}


def link_args(bandwidth: float) -> list[str]:
    return [f"{name}={bandwidth:g}mbit,{rtt:g}ms" for name, rtt in RTT_MS.items()]


def throttled_profile(model_path: Path, graph: Graph, device_cpu: float) -> list[float]:
    """Node times measured by wpk-profile running under the emulated device's CPU quota."""
    limit = CpuLimit(f"wpk{os.getpid()}.bench-profile", device_cpu)
    out = model_path.with_suffix(".device-profile.json")
    try:
        subprocess.run([sys.executable, "-m", "wpk.profile_cli", str(model_path), "-o", str(out),
                        "--threads", "1", "--runs", "10", "--name", "emulated-device", "-q"],
                       check=True, preexec_fn=lambda: limit.add(os.getpid()),
                       stdout=subprocess.DEVNULL)
    finally:
        limit.close()
    return load_profile(out).node_times_for(graph)


def local_costs(model_path: Path, graph: Graph, device_cpu: float) -> dict:
    """Per-node times profiled here (1 thread); the device's under its CPU quota."""
    document = profile_model(model_path, threads=1, progress=False, name="this-machine")
    node_ms = Profile.from_document(document).node_times_for(graph)
    device_ms = throttled_profile(model_path, graph, device_cpu)
    return {"device": [measured_costs("device", device_ms, f"measured at {device_cpu:g} CPU")],
            "edge": [measured_costs("edge", node_ms, "measured here")],
            "cloud": [measured_costs("cloud", node_ms, "measured here")]}


def describe(plan) -> str:
    return " | ".join(f"{t.name} {len(t.nodes)}" for t in plan.tiers if t.nodes) or "-"


class Runner:
    """Runs plans in emulations, keeping one running while only the bandwidth changes."""

    def __init__(self, device_cpu: float, requests: int):
        self.device_cpu, self.requests = device_cpu, requests
        self.current: tuple[str, Emulation] | None = None

    def measure(self, plan_dir: Path, key: str, bandwidth: float) -> tuple[float, float] | None:
        plan = load_plan(plan_dir)
        links = emulated_links(plan, [a for a in link_args(bandwidth)
                                      if _link_in_plan(a, plan)])
        predicted_net = sum(l.predicted_ms() for l in links)
        if predicted_net > MAX_PREDICTED_MS:
            return None
        if self.current is None or self.current[0] != key:
            self.close()
            emulation = Emulation(plan_dir, links, threads=1, cpu={"device": self.device_cpu})
            emulation.start()
            self.current = (key, emulation)
        emulation = self.current[1]
        for i, link in enumerate(links):
            if emulation.links[i].bandwidth_mbps != link.bandwidth_mbps:
                emulation.set_bandwidth(i, link.bandwidth_mbps)
        slow = predicted_net > 1000
        result = emulation.measure(requests=1 if slow else self.requests, warmup=0 if slow else 1,
                                   compute_requests=2)
        return result.measured_ms, result.predicted_ms

    def close(self) -> None:
        if self.current is not None:
            self.current[1].close()
            self.current = None


def _link_in_plan(arg: str, plan) -> bool:
    pair = arg.split("=")[0]
    hops = set()
    for link in plan.links:
        chain = [link.src, *link.via, link.dst]
        hops |= {f"{a}-{b}" for a, b in zip(chain, chain[1:])}
    return pair in hops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--bandwidths", default=",".join(map(str, BANDWIDTHS_MBPS)),
                        help="Mbit/s, comma-separated (default 1,10,100,1000)")
    parser.add_argument("--device-cpu", type=float, default=0.1,
                        help="the device's share of one CPU (default 0.1)")
    parser.add_argument("--requests", type=int, default=5, help="timed requests per point")
    parser.add_argument("--quick", action="store_true", help="mlp and resnet_like, 10/100 Mbit/s")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("emulated_partitions needs root (network namespaces, tc, cgroups)", file=sys.stderr)
        return 2
    models = ["mlp", "resnet_like"] if args.quick else args.models.split(",")
    bandwidths = [10.0, 100.0] if args.quick else [float(b) for b in args.bandwidths.split(",")]
    console = make_console()
    table = Table(title=f"measured end-to-end latency, ms (device at {args.device_cpu:g} CPU; "
                        f"RTT {RTT_MS['device-edge']:g} ms device-edge, "
                        f"{RTT_MS['edge-cloud']:g} ms edge-cloud)")
    for column in ("model", "Mbit/s", "chosen cut", "predicted", "chosen", "all-on-device",
                   "all-on-cloud*", "device / chosen", "cloud / chosen"):
        table.add_column(column, justify="left" if column in ("model", "chosen cut") else "right")
    runner = Runner(args.device_cpu, args.requests)
    ratios: dict[str, list[float]] = {}
    fmt = lambda v: "skipped" if v is None else f"{v:.1f}"  # noqa: E731
    try:
        with tempfile.TemporaryDirectory(prefix="wpk-bench-") as tmp:
            tmp = Path(tmp)
            for name in models:
                model_path = tmp / f"{name}.onnx"
                onnx.save(MODELS[name](), model_path)
                graph = Graph.load(model_path)
                costs = local_costs(model_path, graph, args.device_cpu)
                nodes = [n.name for n in graph.nodes]
                common = dict(measured=costs, use_calibration=False, verify=False)
                partition(graph, ["device", "edge", "cloud"], links=link_args(bandwidths[0]),
                          pins={n: "device" for n in nodes}, out_dir=tmp / f"{name}-device",
                          **common)
                partition(graph, ["device", "edge", "cloud"], links=link_args(bandwidths[0]),
                          pins={n: "cloud" for n in nodes}, privacy="none",
                          out_dir=tmp / f"{name}-cloud", **common)
                device = runner.measure(tmp / f"{name}-device", f"{name}-device", bandwidths[0])
                device_cut = describe(load_plan(tmp / f"{name}-device"))
                for bandwidth in bandwidths:
                    out = tmp / f"{name}-{bandwidth:g}"
                    plan = partition(graph, ["device", "edge", "cloud"],
                                     links=link_args(bandwidth), out_dir=out, **common).plan
                    cut = describe(plan)
                    cloud = runner.measure(tmp / f"{name}-cloud", f"{name}-cloud", bandwidth)
                    if cut == device_cut:  # the same plan: one measurement for both columns
                        chosen = device
                    else:
                        chosen = runner.measure(out, f"{name}-{cut}", bandwidth)
                    vs = {}
                    for key, baseline in (("device", device), ("cloud", cloud)):
                        if chosen and baseline:
                            vs[key] = baseline[0] / chosen[0]
                            ratios.setdefault(key, []).append(vs[key])
                    table.add_row(name, f"{bandwidth:g}", cut, f"{plan.predicted['latency_ms']:.1f}",
                                  fmt(chosen and chosen[0]), fmt(device and device[0]),
                                  fmt(cloud and cloud[0]),
                                  *(f"{vs[k]:.2f}x" if k in vs else "-"
                                    for k in ("device", "cloud")))
                    console.print(f"  {name} @ {bandwidth:g} Mbit/s: {cut}", style="dim")
    finally:
        runner.close()
    console.print(table)
    console.print("* all-on-cloud ships the raw input, which the default privacy constraint "
                  "forbids the chosen plan to do; 'predicted' is the partitioner's, which has no "
                  "term for the runtime's own per-request work on the (slowed) device")
    for key, values in ratios.items():
        console.print(f"all-on-{key} / chosen: geometric mean "
                      f"{statistics.geometric_mean(values):.2f}x, range {min(values):.2f}x-"
                      f"{max(values):.2f}x over {len(values)} points (> 1: the chosen plan is "
                      f"faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
