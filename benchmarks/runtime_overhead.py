"""Runtime overhead: the whole model in one ONNX Runtime session vs. the same model served as a
3-tier local pipeline (three wpk-serve processes on 127.0.0.1), measured side by side.

    python benchmarks/runtime_overhead.py [--models mlp,resnet_like,mobilenet_like] [--seconds 2]

(a) whole model, one ORT session, one request at a time;
(b) the 3-tier pipeline, one request at a time -> per-hop overhead in microseconds:
    (pipeline latency - sum of the stages run alone) / hops, hops = 3 (client->device,
    device->edge, edge->cloud); targets: < 300 us per hop for tensors under 1 MB;
(c) pipeline throughput with 1..16 requests in flight vs. the slowest stage alone (target
    >= 80 %). Every tier and every baseline runs ONNX Runtime with the same thread count.
    On a machine with fewer cores than tiers the stages also compete for CPU: the table adds
    the CPU-bound ceiling min(1/slowest, cores/sum of stages) and the ratio to it.

Plans come from wpk.partitioner, with the cuts pinned where the model's measured ORT time
splits into thirds (every tier runs on this machine, so balanced stages are the fair case).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from wpk.deploy.local import LocalDeployment  # noqa: E402
from wpk.examples import EXAMPLES  # noqa: E402
from wpk.plan import load_plan, slice_path  # noqa: E402
from wpk.runtime import protocol as pb  # noqa: E402
from wpk.runtime.client import InferenceClient  # noqa: E402

console = Console()


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_run(run, seconds: float, min_runs: int = 20) -> float:
    """Median seconds per call of `run()` over about `seconds`."""
    run()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < min_runs:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def balanced_cuts(model_path: Path, threads: int) -> list[int]:
    """Node positions splitting the model's per-node ORT time (profiled) into thirds."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.profile_file_prefix = str(model_path.with_suffix(""))
    sess = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feeds = random_feeds(sess)
    for _ in range(10):
        sess.run(None, feeds)
    import json

    events = json.load(open(sess.end_profiling()))
    cost: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            cost[name] = cost.get(name, 0.0) + event["dur"]
    model = onnx.load(str(model_path))
    times = np.array([cost.get(n.name, 0.0) for n in model.graph.node])
    cumulative = np.cumsum(times) / max(times.sum(), 1e-9)
    cuts = [int(np.searchsorted(cumulative, f)) + 1 for f in (1 / 3, 2 / 3)]
    cuts[1] = max(cuts[1], cuts[0] + 1)
    return [min(c, len(times) - 2 + i) for i, c in enumerate(cuts)]


def random_feeds(sess) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
            .astype(np.float32) for i in sess.get_inputs()}


SAME_TIERS = """\
tiers:
  - {name: device, preset: edge-cpu}
  - {name: edge, preset: edge-cpu}
  - {name: cloud, preset: edge-cpu}
links:
  - {from: device, to: edge, bandwidth: 10gbit, rtt: 0.1ms}
  - {from: edge, to: cloud, bandwidth: 10gbit, rtt: 0.1ms}
"""


def make_plan_dir(name: str, root: Path, threads: int, codec: str = "raw") -> Path:
    """A 3-tier plan from wpk.partitioner, cuts pinned where the measured time splits in thirds
    (all tiers run on this machine, so balanced stages are what pipelining needs)."""
    from wpk.naming import node_names
    from wpk.partitioner.api import partition

    model_path = root / f"{name}.onnx"
    model = EXAMPLES[name]()
    onnx.save(model, str(model_path))
    names = node_names(list(model.graph.node))
    cut_1, cut_2 = balanced_cuts(model_path, threads)
    pins = {names[cut_1 - 1]: "device", names[cut_1]: "edge", names[cut_2 - 1]: "edge",
            names[cut_2]: "cloud"}
    tiers_file = root / "tiers.yaml"
    tiers_file.write_text(SAME_TIERS)
    plan_dir = root / f"{name}_plan"
    partition(model_path, tiers_file=tiers_file, objective="throughput", pins=pins,
              out_dir=plan_dir, use_calibration=False)
    if codec != "raw":
        import json

        data = json.loads((plan_dir / "plan.json").read_text())
        for link in data["links"]:
            link["codec"] = codec
        (plan_dir / "plan.json").write_text(json.dumps(data, indent=2))
    return plan_dir


async def pipeline_latency(address: str, model: str, feeds, seconds: float,
                           stream: bool = False) -> float:
    async with InferenceClient(address, timeout=30, stream=stream) as client:
        await client.infer(model, feeds)
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 20:
            start = time.perf_counter()
            await client.infer(model, feeds)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


async def pipeline_throughput(address: str, model: str, feeds, in_flight: int,
                              seconds: float) -> float:
    async with InferenceClient(address, timeout=30, stream=True) as client:
        request_count = 0

        async def worker(end: float):
            nonlocal request_count
            while time.perf_counter() < end:
                await client.infer(model, feeds)
                request_count += 1

        await asyncio.gather(*(client.infer(model, feeds) for _ in range(in_flight)))
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds) for _ in range(in_flight)))
        return request_count / (time.perf_counter() - start)


def slice_seconds(metrics_url: str) -> float:
    """Mean slice run time inside a tier server, from its /metrics."""
    import re
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    total = float(re.search(r"wpk_slice_seconds_sum\{[^}]*\} (\S+)", text).group(1))
    count = float(re.search(r"wpk_slice_seconds_count\{[^}]*\} (\S+)", text).group(1))
    return total / max(count, 1)


def bench_model(name: str, root: Path, threads: int, seconds: float, port: int,
                codec: str) -> dict:
    plan_dir = make_plan_dir(name, root, threads, codec)
    plan = load_plan(plan_dir)
    whole = session(plan_dir.parent / f"{name}.onnx", threads)
    feeds = random_feeds(whole)
    t_whole = time_run(lambda: whole.run(None, feeds), seconds)

    # stages alone, fed with the tensors they really receive
    stage_times, arrays = [], dict(feeds)
    for tier in plan.tiers:
        sess = session(slice_path(plan_dir, tier), threads)
        tier_feeds = {n: arrays[n] for n in tier.slice_inputs}
        stage_times.append(time_run(lambda: sess.run(tier.slice_outputs, tier_feeds), seconds))
        arrays.update(zip(tier.slice_outputs, sess.run(tier.slice_outputs, tier_feeds)))
    link_bytes = [sum(int(arrays[t].nbytes) for t in tier.forward) for tier in plan.tiers[:-1]]

    with LocalDeployment(plan_dir, port=port, threads=threads, metrics=True) as deployment:
        t_pipe = asyncio.run(pipeline_latency(deployment.entry, plan.name, feeds, seconds))
        in_tier = [slice_seconds(handle.metrics_url) for handle in deployment.tiers]
        t_pipe_stream = asyncio.run(pipeline_latency(deployment.entry, plan.name, feeds, seconds,
                                                     stream=True))
        rates = {k: asyncio.run(pipeline_throughput(deployment.entry, plan.name, feeds, k,
                                                    seconds))
                 for k in (1, 2, 4, 8, 16)}
    hops = len(plan.tiers)
    slowest = max(stage_times)
    ceiling = min(1 / slowest, (os.cpu_count() or 1) / sum(stage_times))
    return {"name": name, "t_whole": t_whole, "stages": stage_times, "t_pipe": t_pipe,
            "t_pipe_stream": t_pipe_stream, "in_tier": in_tier,
            "per_hop_us": (t_pipe - sum(stage_times)) / hops * 1e6,
            "per_hop_stream_us": (t_pipe_stream - sum(stage_times)) / hops * 1e6,
            "per_hop_in_tier_us": (t_pipe - sum(in_tier)) / hops * 1e6,
            "per_hop_vs_whole_us": (t_pipe - t_whole) / hops * 1e6,
            "link_bytes": link_bytes, "input_bytes": sum(a.nbytes for a in feeds.values()),
            "rates": rates, "stage_rate": 1 / slowest, "ceiling": ceiling}


class Echo:
    """A gRPC server that does no work: the bare cost of one hop, for comparison."""

    async def ModelInfer(self, request, context):
        return pb.ModelInferResponse(id=request.id)

    async def ModelStreamInfer(self, requests, context):
        async for request in requests:
            await context.write(pb.ModelStreamInferResponse(
                infer_response=pb.ModelInferResponse(id=request.id)))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    ServerReady = ModelReady = ServerMetadata = ModelMetadata = ServerLive


async def echo_server(port: int) -> None:
    import grpc

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((pb.generic_handler(Echo()),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def bare_grpc_hops(port: int, seconds: float) -> tuple[float, float]:
    """Median round trip (s) of an empty ModelInfer to a do-nothing server in another process:
    unary call, and one message on a stream."""
    import subprocess

    server = subprocess.Popen([sys.executable, __file__, "--echo-server", str(port)],
                              stdout=subprocess.PIPE)
    try:
        server.stdout.readline()

        async def measure(stream: bool) -> float:
            async with InferenceClient(f"127.0.0.1:{port}", timeout=10, stream=stream) as c:
                request = pb.ModelInferRequest(model_name="echo")
                for _ in range(50):
                    await c.infer_message(request)
                times = []
                end = time.perf_counter() + seconds
                while time.perf_counter() < end:
                    start = time.perf_counter()
                    await c.infer_message(request)
                    times.append(time.perf_counter() - start)
                return statistics.median(times)

        return asyncio.run(measure(False)), asyncio.run(measure(True))
    finally:
        server.kill()
        server.wait()


def report(results: list[dict], threads: int, bare: tuple[float, float], codec: str) -> None:
    console.print(f"bare gRPC hop on this machine now (empty message, server in another "
                  f"process): unary {bare[0] * 1e6:.0f} us, stream {bare[1] * 1e6:.0f} us")
    table = Table(title=f"(a)+(b) latency, one request at a time (ORT threads per tier: "
                        f"{threads}, {os.cpu_count()} cores, link codec {codec})")
    for column in ("model", "whole ORT ms", "stages alone ms", "stages in tiers ms",
                   "pipeline ms (unary | stream client)", "per hop us (unary | stream)",
                   "per hop us, in-tier compute", "bytes in -> links", "< 300 us"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r["name"], f"{r['t_whole'] * 1e3:.2f}",
                      " + ".join(f"{t * 1e3:.2f}" for t in r["stages"]),
                      " + ".join(f"{t * 1e3:.2f}" for t in r["in_tier"]),
                      f"{r['t_pipe'] * 1e3:.2f} | {r['t_pipe_stream'] * 1e3:.2f}",
                      f"{r['per_hop_us']:.0f} | {r['per_hop_stream_us']:.0f}",
                      f"{r['per_hop_in_tier_us']:.0f}",
                      f"{r['input_bytes'] / 1e3:.0f}k -> "
                      + ", ".join(f"{b / 1e3:.0f}k" for b in r["link_bytes"]),
                      "yes" if r["per_hop_stream_us"] < 300 else "NO")
    console.print(table)
    table = Table(title="(c) pipelined throughput, requests/s, vs the slowest stage alone")
    for column in ("model", "slowest stage", "cpu ceiling", *(f"{k} in flight" for k in
                                                              (1, 2, 4, 8, 16)),
                   "best / slowest", "best / ceiling", ">= 80 %"):
        table.add_column(column, justify="right")
    for r in results:
        best = max(r["rates"].values())
        table.add_row(r["name"], f"{r['stage_rate']:.0f}", f"{r['ceiling']:.0f}",
                      *(f"{v:.0f}" for v in r["rates"].values()),
                      f"{best / r['stage_rate']:.0%}", f"{best / r['ceiling']:.0%}",
                      "yes" if best / r["stage_rate"] >= 0.8 else
                      ("at ceiling" if best / r["ceiling"] >= 0.8 else "NO"))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet_like,mobilenet_like")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=1, help="ORT threads per tier")
    parser.add_argument("--port", type=int, default=18001)
    parser.add_argument("--codec", default="raw",
                        help="wire codec on every link (raw, fp16, int8, ...+zstd)")
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        asyncio.run(echo_server(args.echo_server))
        return 0
    bare = bare_grpc_hops(args.port + 50, min(args.seconds, 1.0))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            console.print(f"[dim]measuring {name}...[/dim]")
            results.append(bench_model(name, Path(tmp), args.threads, args.seconds, args.port,
                                       args.codec))
    report(results, args.threads, bare, args.codec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
