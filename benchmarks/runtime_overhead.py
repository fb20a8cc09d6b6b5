"""Runtime overhead: the whole model in one ONNX Runtime session vs. the same model served as a
3-tier local pipeline (three wpk-serve processes on 127.0.0.1), measured side by side.

    python benchmarks/runtime_overhead.py [--models mlp,resnet_like,mobilenet_like] [--seconds 2]
                                          [--link tcp] [--cpu-latency-us 0]

Each link kind (`--link`: the tensor link `tcp`, the one tiers use; `grpc`, gRPC streams, was
removed and is left out with a warning) gets its own 3-tier deployment; with several, they
run side by side and every measurement alternates between them round by round. With
`--cpu-latency-us US` (root) every link is also measured
with the machine's idle CPUs held to wake within US microseconds (wpk-serve's option of the
same name, see wpk.runtime.cpu_latency), alternating round by round with the machine as it
is: rows "tcp" and "tcp, cpu US us". With `--pin-cpus` every link gets a second deployment
whose tiers are pinned (wpk-deploy --local --pin-cpus), measured side by side: rows "tcp,
pinned". The baselines (whole model, stages alone) are measured once, unpinned and without
the limit, and serve every row.

(a) whole model, one ORT session, one request at a time;
(b) the 3-tier pipeline, one request at a time -> per-hop overhead in microseconds:
    (pipeline latency - sum of the stages run alone) / hops, hops = 3 (client->device,
    device->edge, edge->cloud); targets: < 300 us per hop for tensors under 1 MB; for the
    KServe client (unary ModelInfer calls) and for the client that enters over the entry
    tier's tensor link (wpk.runtime.link_client, "link"); and the
    tier-to-tier hops alone: the second tier sent what the first forwards, over the link
    under test, (latency - its stages) / 2; and where the overhead goes, from the tiers' own
    metrics: the client hop (latency less the entry tier's stay) and each tier's stay less
    its slice and the next tier's stay;
(c) pipeline throughput with 1..16 requests in flight vs. the slowest stage alone (target
    >= 80 %), with the unary client and the link client. Every tier and
    every baseline runs ONNX Runtime with the same thread count.
    On a machine with fewer cores than tiers the stages also compete for CPU: the table adds
    the CPU-bound ceiling min(1/slowest, cores/sum of stages) and the ratio to it, and the
    CPU time each tier process and the client spend per request (cores / their sum bounds
    the throughput on this machine).

Plans come from wpk.partitioner, with the cuts pinned where the model's FLOPs split into
thirds (every tier runs on this machine, so balanced stages are the fair case).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich.table import Table

from wpk.console import make_console
from wpk.deploy.local import LocalDeployment  # noqa: E402
from wpk.examples import EXAMPLES  # noqa: E402
from wpk.plan import load_plan, slice_path  # noqa: E402
from wpk.runtime import protocol as pb  # noqa: E402
from wpk.runtime.client import InferenceClient  # noqa: E402
from wpk.runtime.link_client import LinkClient  # noqa: E402
from wpk.errors import WpkError  # noqa: E402
from wpk.runtime.cpu_latency import (CpuLatencyLimit, cpu_latency_limit,  # noqa: E402
                                     current_limit)
from wpk.runtime.cpus import available_cpus, split_cores, split_for_plan  # noqa: E402

console = make_console()


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def balanced_cuts(model_path: Path) -> tuple[list[str], int, int]:
    """Node names in flow order and two cut positions splitting the FLOPs into thirds
    (FLOPs, not a profile, so that every run of the benchmark cuts the same way)."""
    from wpk.graph import Graph

    graph = Graph.load(model_path)
    flops = np.array([node.flops for node in graph.nodes])
    cumulative = np.cumsum(flops) / max(flops.sum(), 1.0)
    cut_1 = int(np.searchsorted(cumulative, 1 / 3)) + 1
    cut_2 = max(int(np.searchsorted(cumulative, 2 / 3)) + 1, cut_1 + 1)
    return [node.name for node in graph.nodes], cut_1, min(cut_2, len(flops) - 1)


def random_feeds(sess) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
            .astype(np.float32) for i in sess.get_inputs()}


# Every tier on this machine's hardware, fast links: the pins decide the cuts.
ONE_MACHINE_TIERS = Path(__file__).parents[1] / "examples" / "one-machine.yaml"


def make_plan_dir(name: str, root: Path, codec: str = "raw",
                  model: onnx.ModelProto | None = None) -> Path:
    """A 3-tier plan from wpk.partitioner, cuts pinned where the FLOPs split in thirds (all
    tiers run on this machine, so balanced stages are what pipelining needs). `model`: the
    network to plan (default: the built-in example `name`)."""
    from wpk.partitioner.api import partition

    model_path = root / f"{name}.onnx"
    onnx.save(EXAMPLES[name]() if model is None else model, str(model_path))
    names, cut_1, cut_2 = balanced_cuts(model_path)
    pins = {names[cut_1 - 1]: "device", names[cut_1]: "edge", names[cut_2 - 1]: "edge",
            names[cut_2]: "cloud"}
    plan_dir = root / f"{name}_plan"
    partition(model_path, tiers_file=ONE_MACHINE_TIERS, objective="throughput", pins=pins,
              codecs=[f"device-edge={codec}", f"edge-cloud={codec}"], out_dir=plan_dir,
              use_calibration=False)
    return plan_dir


def sample(run, seconds: float, into: list[float]) -> None:
    """Append the duration of each `run()` call made during about `seconds`."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        run()
        into.append(time.perf_counter() - start)


async def sample_async(call, seconds: float, into: list[float]) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        await call()
        into.append(time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def pipeline_rate(client: InferenceClient, model: str, feeds, in_flight: int,
                        seconds: float, cpu: dict | None = None) -> float:
    """Requests per second with `in_flight` requests outstanding all the time. With `cpu`
    ({"pids": [...]}): adds the CPU seconds each pid used and the requests to it."""
    count = 0

    async def worker(end: float) -> None:
        nonlocal count
        while time.perf_counter() < end:
            await client.infer(model, feeds)
            count += 1

    await asyncio.gather(*(client.infer(model, feeds) for _ in range(in_flight)))
    before = [cpu_seconds(pid) for pid in cpu["pids"]] if cpu else []
    start = time.perf_counter()
    await asyncio.gather(*(worker(start + seconds) for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    if cpu:
        used = [cpu_seconds(pid) - b for pid, b in zip(cpu["pids"], before)]
        cpu["seconds"] = [a + b for a, b in zip(cpu.get("seconds", [0.0] * len(used)), used)]
        cpu["requests"] = cpu.get("requests", 0) + count
    return count / elapsed


def histogram_totals(metrics_url: str, metric: str) -> tuple[float, float]:
    """(sum, count) of a tier server's histogram so far (every label summed), from its
    /metrics: `wpk_slice_seconds` (its slice alone) or `wpk_request_seconds` (a request's
    whole stay in the tier, the next tiers' time included)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    total = sum(map(float, re.findall(metric + r"_sum\{[^}]*\} (\S+)", text)))
    count = sum(map(float, re.findall(metric + r"_count\{[^}]*\} (\S+)", text)))
    return total, count


@contextlib.contextmanager
def histogram_deltas(deployment: LocalDeployment, slices: list[list[float]],
                     stays: list[list[float]]):
    """Adds to [sum, count] per tier what its slice and stay histograms gained in the block."""
    urls = [handle.metrics_url for handle in deployment.tiers]
    kinds = ((slices, "wpk_slice_seconds"), (stays, "wpk_request_seconds"))
    before = [[histogram_totals(url, metric) for url in urls] for _, metric in kinds]
    yield
    for (sums, metric), was in zip(kinds, before):
        for tier_sums, url, (total, count) in zip(sums, urls, was):
            now_total, now_count = histogram_totals(url, metric)
            tier_sums[0] += now_total - total
            tier_sums[1] += now_count - count


ROUNDS = 5            # measurements alternate between what is compared, round by round,
IN_FLIGHT = (1, 2, 4, 8, 16)  # so that load from elsewhere hits both sides alike
CPU_IN_FLIGHT = 8     # CPU time per request is measured at this many in flight
CLIENTS = ("unary", "link")   # KServe ModelInfer calls; the entry tier's tensor link


def second_tier_caller(deployment: LocalDeployment, plan, arrays):
    """(a coroutine function sending the second tier what the first one forwards, the way
    the first tier does, over the tensor link; its client): timing it gives the cost of the
    tier-to-tier hops alone, without the client's hop."""
    tier = plan.tiers[1]
    feeds = {n: arrays[n] for n in tier.inputs}
    model = f"{plan.name}.{tier.name}"
    client = LinkClient(deployment.tiers[1].address, timeout=30)
    return lambda: client.infer(model, feeds, pipeline=True), client


Setup = tuple[str, bool]   # (link, pinned): one deployment


def variants_of(links: list[str], cpu_latency_us: int | None, pin: bool
                ) -> list[tuple[str, Setup, int | None]]:
    """(label, deployment, wake-up latency limit held while measuring it) of each thing
    compared: every link as it is, with `pin` also with its tiers pinned (a deployment of
    its own), and with `cpu_latency_us` each of those again under that limit."""
    setups = [(link, pinned) for pinned in ((False, True) if pin else (False,))
              for link in links]
    limits = (None,) if cpu_latency_us is None else (None, cpu_latency_us)
    return [(link + (", pinned" if pinned else "")
             + ("" if limit is None else f", cpu {limit} us"), (link, pinned), limit)
            for limit in limits for link, pinned in setups]


def bench_model(name: str, root: Path, threads: int, seconds: float, port: int,
                codec: str, links: list[str], serve_args: list[str] | None = None,
                cpu_latency_us: int | None = None, pin: bool = False) -> list[dict]:
    """One result per variant (see variants_of); the deployments of every link run side by
    side and the measurements alternate between the variants round by round."""
    variants = variants_of(links, cpu_latency_us, pin)
    plan_dir = make_plan_dir(name, root, codec)
    plan = load_plan(plan_dir)
    whole = session(plan_dir.parent / f"{name}.onnx", threads)
    feeds = random_feeds(whole)
    stages, arrays = [], dict(feeds)  # each stage fed with the tensors it really receives
    for tier in plan.tiers:
        sess = session(slice_path(plan_dir, tier), threads)
        tier_feeds = {n: arrays[n] for n in tier.slice_inputs}
        arrays.update(zip(tier.slice_outputs, sess.run(tier.slice_outputs, tier_feeds)))
        stages.append((lambda s=sess, t=tier, f=tier_feeds: s.run(t.slice_outputs, f)))
    link_bytes = [sum(int(arrays[t].nbytes) for t in tier.forward) for tier in plan.tiers[:-1]]
    for run in [lambda: whole.run(None, feeds), *stages]:
        sample(run, 0.2, [])  # warm up

    setups = list(dict.fromkeys(setup for _, setup, _ in variants))
    cpus = split_for_plan(plan) if pin else None
    deployments = [LocalDeployment(plan_dir, port=port + 10 * i, threads=threads, metrics=True,
                                   link=link, serve_args=serve_args,
                                   cpus=cpus if pinned else None)
                   for i, (link, pinned) in enumerate(setups)]
    try:
        for deployment in deployments:
            deployment.start()

        async def measure() -> dict:
            on = dict(zip(setups, deployments))
            unary = {k: InferenceClient(d.entry, timeout=30) for k, d in on.items()}
            # the client that enters over the entry tier's tensor link (gRPC where none)
            link = {k: LinkClient(d.entry, timeout=30) for k, d in on.items()}
            second = {k: second_tier_caller(d, plan, arrays) for k, d in on.items()}
            t = {"whole": [], **{i: [] for i in range(len(stages))},
                 **{(v, m): [] for v, _, _ in variants for m in ("unary", "link", "second")}}
            # the tiers' own histograms, summed over each variant's turns: (sum, count)
            slices = {v: [[0.0, 0.0] for _ in plan.tiers] for v, _, _ in variants}
            stays = {v: [[0.0, 0.0] for _ in plan.tiers] for v, _, _ in variants}
            slice_time = seconds / ROUNDS / 2
            clients = (*unary.values(), *link.values())
            for client in clients:
                await sample_async(lambda: client.infer(plan.name, feeds), 0.2, [])
            for call, _ in second.values():
                await sample_async(call, 0.2, [])
            for _ in range(ROUNDS):
                sample(lambda: whole.run(None, feeds), slice_time, t["whole"])
                for i, run in enumerate(stages):
                    sample(run, slice_time, t[i])
                for v, k, limit in variants:
                    with cpu_latency_limit(limit):
                        with histogram_deltas(on[k], slices[v], stays[v]):
                            for m, client in (("unary", unary[k]), ("link", link[k])):
                                await sample_async(lambda: client.infer(plan.name, feeds),
                                                   slice_time, t[(v, m)])
                        await sample_async(second[k][0], slice_time, t[(v, "second")])
            latency = {k: statistics.median(v) for k, v in t.items()}
            slowest = max(range(len(stages)), key=lambda i: latency[i])
            rates: dict = {(v, n, c): [] for v, _, _ in variants for n in IN_FLIGHT
                           for c in CLIENTS}
            cpu = {(v, c): {"pids": [h.process.pid for h in on[k].tiers] + [os.getpid()]}
                   for v, k, _ in variants for c in CLIENTS}
            stage_alone: list[float] = []
            for _ in range(ROUNDS):
                for n in IN_FLIGHT:
                    for v, k, limit in variants:
                        with cpu_latency_limit(limit):
                            for c, client in (("unary", unary[k]), ("link", link[k])):
                                rates[(v, n, c)].append(await pipeline_rate(
                                    client, plan.name, feeds, n, slice_time,
                                    cpu[(v, c)] if n == CPU_IN_FLIGHT else None))
                    sample(stages[slowest], slice_time, stage_alone)
            for client in (*clients, *(c for _, c in second.values())):
                await client.close()
            mean = lambda sums: [total / max(count, 1) for total, count in sums]  # noqa: E731
            return {"latency": latency, "in_tier": {v: mean(s) for v, s in slices.items()},
                    "stays": {v: mean(s) for v, s in stays.items()}, "cpu": {
                        v: [c / max(u["requests"], 1) for c in u["seconds"]]
                        for v, u in cpu.items()},
                    "rates": {key: statistics.median(r) for key, r in rates.items() if r},
                    "stage_rate": 1 / statistics.median(stage_alone)}

        measured = asyncio.run(measure())
    finally:
        for deployment in deployments:
            deployment.stop()
    latency = measured["latency"]
    stage_times = [latency[i] for i in range(len(stages))]
    hops = len(plan.tiers)
    ceiling = min(measured["stage_rate"], (os.cpu_count() or 1) / sum(stage_times))
    results = []
    for k, _, _ in variants:
        unary, link = (latency[(k, c)] for c in CLIENTS)
        results.append({
            "name": name, "link": k, "t_whole": latency["whole"], "stages": stage_times,
            "t_pipe": unary, "t_pipe_link": link, "in_tier": measured["in_tier"][k],
            "per_hop_us": (unary - sum(stage_times)) / hops * 1e6,
            "per_hop_link_us": (link - sum(stage_times)) / hops * 1e6,
            "per_hop_in_tier_us": (unary - sum(measured["in_tier"][k])) / hops * 1e6,
            "per_hop_link_in_tier_us": (link - sum(measured["in_tier"][k])) / hops * 1e6,
            "tier_hop_us": (latency[(k, "second")] - sum(stage_times[1:])) / (hops - 1) * 1e6,
            "own_us": own_times(unary, measured["stays"][k], measured["in_tier"][k]),
            "link_bytes": link_bytes, "input_bytes": sum(a.nbytes for a in feeds.values()),
            "rates": {c: {n: measured["rates"][(k, n, c)] for n in IN_FLIGHT} for c in CLIENTS},
            "cpu_per_request": {c: measured["cpu"][(k, c)] for c in CLIENTS},
            "stage_rate": measured["stage_rate"], "ceiling": ceiling})
    return results


def own_times(latency: float, stays: list[float], slices: list[float]) -> list[float]:
    """Where one request's overhead goes (us), from the tiers' own metrics: the client hop
    (the client's latency less the entry tier's stay), then each tier's stay less its slice
    and the next tier's stay (for the entry and middle tiers this includes the hop to the
    next tier). Means over the requests of the latency clients (stays: measured by the
    tiers; `latency`: the median the client saw)."""
    downstream = [*stays[1:], 0.0]
    return [(latency - stays[0]) * 1e6, *((stay - piece - after) * 1e6 for stay, piece, after
                                         in zip(stays, slices, downstream))]


class Echo:
    """A gRPC server that does no work: the bare cost of one hop, for comparison."""

    async def ModelInfer(self, request, context):
        return pb.ModelInferResponse(id=request.id)

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


def bare_grpc_hops(port: int, seconds: float, limits: list[int | None]
                   ) -> dict[int | None, float]:
    """Median round trip (s) of an empty ModelInfer call to a do-nothing server in another
    process, under each wake-up latency limit of `limits`."""
    import subprocess

    server = subprocess.Popen([sys.executable, __file__, "--echo-server", str(port)],
                              stdout=subprocess.PIPE)
    try:
        server.stdout.readline()

        async def measure() -> float:
            async with InferenceClient(f"127.0.0.1:{port}", timeout=10) as c:
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

        async def measure_all() -> dict[int | None, float]:
            hops = {}
            for limit in limits:
                with cpu_latency_limit(limit):
                    hops[limit] = await measure()
            return hops

        return asyncio.run(measure_all())
    finally:
        server.kill()
        server.wait()


def report(results: list[dict], threads: int, bare: dict[int | None, float],
           codec: str) -> None:
    for limit, unary in bare.items():
        held = "" if limit is None else f", idle CPUs held to wake within {limit} us"
        console.print(f"bare gRPC hop on this machine now (empty message, server in another "
                      f"process{held}): unary {unary * 1e6:.0f} us")
    table = Table(title=f"(a)+(b) latency, one request at a time (ORT threads per tier: "
                        f"{threads}, {os.cpu_count()} cores, link codec {codec})")
    for column in ("model", "link", "whole ORT ms", "stages alone ms", "stages in tiers ms",
                   "pipeline ms (unary | link client)", "per hop us (unary | link)",
                   "per hop us less in-tier compute (unary | link)", "tier->tier hop us",
                   "own us (unary): client hop | each tier", "bytes in -> links",
                   "< 300 us (unary | link)"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r["name"], r["link"], f"{r['t_whole'] * 1e3:.2f}",
                      " + ".join(f"{t * 1e3:.2f}" for t in r["stages"]),
                      " + ".join(f"{t * 1e3:.2f}" for t in r["in_tier"]),
                      f"{r['t_pipe'] * 1e3:.2f} | {r['t_pipe_link'] * 1e3:.2f}",
                      f"{r['per_hop_us']:.0f} | {r['per_hop_link_us']:.0f}",
                      f"{r['per_hop_in_tier_us']:.0f} | {r['per_hop_link_in_tier_us']:.0f}",
                      f"{r['tier_hop_us']:.0f}",
                      " | ".join(f"{t:.0f}" for t in r["own_us"]),
                      f"{r['input_bytes'] / 1e3:.0f}k -> "
                      + ", ".join(f"{b / 1e3:.0f}k" for b in r["link_bytes"]),
                      " | ".join("yes" if r[key] < 300 else "NO"
                                 for key in ("per_hop_us", "per_hop_link_us")))
    console.print(table)
    table = Table(title="(c) pipelined throughput, requests/s, vs the slowest stage alone "
                        "(unary client, then link client)")
    for column in ("model", "link", "client", "slowest stage", "cpu ceiling",
                   *(f"{k} in flight" for k in IN_FLIGHT),
                   "best / slowest", "best / ceiling", ">= 80 %",
                   f"CPU ms/request at {CPU_IN_FLIGHT} in flight: tiers + client"):
        table.add_column(column, justify="right")
    for r in results:
        for client, rates in r["rates"].items():
            best = max(rates.values())
            cpu = r["cpu_per_request"][client]
            table.add_row(r["name"], r["link"], client, f"{r['stage_rate']:.0f}",
                          f"{r['ceiling']:.0f}", *(f"{v:.0f}" for v in rates.values()),
                          f"{best / r['stage_rate']:.0%}", f"{best / r['ceiling']:.0%}",
                          "yes" if best / r["stage_rate"] >= 0.8 else
                          ("at ceiling" if best / r["ceiling"] >= 0.8 else "NO"),
                          " + ".join(f"{c * 1e3:.2f}" for c in cpu[:-1])
                          + f" + {cpu[-1] * 1e3:.2f}")
    console.print(table)
    for r in {r["name"]: r for r in results}.values():
        if r["ceiling"] < 0.8 * r["stage_rate"]:
            console.print(f"{r['name']}: the 80 % target is out of reach on this machine even "
                          f"with no overhead at all: {os.cpu_count()} cores / the stages' sum "
                          f"give at most {r['ceiling']:.0f} req/s, under 80 % of the slowest "
                          f"stage's {r['stage_rate']:.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet_like,mobilenet_like")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=1, help="ORT threads per tier")
    parser.add_argument("--port", type=int, default=18001)
    parser.add_argument("--codec", default="raw",
                        help="wire codec on every link (raw, fp16, int8, ...+zstd)")
    parser.add_argument("--link", default="tcp",
                        help="tier-to-tier links to compare, side by side (tcp; grpc, gRPC "
                        "streams, was removed: left out with a warning)")
    parser.add_argument("--run", choices=("auto", "inline", "thread", "alone"), default="auto",
                        help="wpk-serve --run for every tier (where slices run)")
    parser.add_argument("--cpu-latency-us", type=int, metavar="US",
                        help="also measure everything with idle CPUs held to wake within US "
                        "us (what wpk-serve --cpu-latency-us does; needs root), alternating "
                        "round by round with the machine as it is")
    parser.add_argument("--pin-cpus", action="store_true",
                        help="also deploy every link with each tier pinned to CPUs of its own "
                        "(wpk-deploy --local --pin-cpus), measured side by side with the unpinned "
                        "deployment (needs a CPU per tier)")
    parser.add_argument("--echo-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        asyncio.run(echo_server(args.echo_server))
        return 0
    links = [k.strip() for k in args.link.split(",") if k.strip()]
    if not links or any(k not in ("tcp", "grpc") for k in links):
        parser.error(f"--link {args.link!r}: expected tcp")
    if "grpc" in links:
        console.print("warning: --link grpc: gRPC streams between tiers were removed; "
                      "measuring the tensor link (tcp)")
        links = ["tcp"]
    if args.cpu_latency_us is not None:
        try:
            CpuLatencyLimit(args.cpu_latency_us).close()
        except WpkError as error:
            parser.error(str(error))
        held = current_limit()
        if held is not None and held <= args.cpu_latency_us:
            console.print(f"[yellow]another process holds a CPU latency limit of {held} us "
                          f"already: rows with and without --cpu-latency-us measure the same "
                          f"machine[/yellow]")
    if args.pin_cpus:
        try:
            split_cores([1.0] * 3, available_cpus())
        except WpkError as error:
            parser.error(f"--pin-cpus: {error}")
    limits = [None] if args.cpu_latency_us is None else [None, args.cpu_latency_us]
    bare = bare_grpc_hops(args.port + 50, min(args.seconds, 1.0), limits)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            console.print(f"[dim]measuring {name}...[/dim]")
            results += bench_model(name, Path(tmp), args.threads, args.seconds, args.port,
                                   args.codec, links, ["--run", args.run],
                                   args.cpu_latency_us, args.pin_cpus)
    report(results, args.threads, bare, args.codec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
