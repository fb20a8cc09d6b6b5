"""Plans for throughput with and without dynamic batching (`wpk-partition --max-batch`),
predicted vs measured requests per second when deployed on this machine.

resnet_like (wpk's CNN example, 64x64 input) is profiled here at batch 1 and at batch N
(ORT, `--threads` threads as the tiers will run, one machine name; three profiles of each, in turns, node by node the
median); `wpk-partition --objective throughput` plans it over two
tiers on this machine (fast links) from the batch-1 profile, and with `--max-batch N` from
both (lone requests' times from the one, batched times from the other); with `--costs
roofline`, from the roofline estimate instead (the tiers' `edge-cpu` preset with default
efficiencies: not fitted to this machine, so only the ratios carry over). Each plan is
deployed as `wpk-deploy --local --threads T` would start it (the batched plan: each tier it
batches with `--max-batch N`, gRPC streams between the tiers), and also the batched plan's
cuts without batching (`wpk-deploy --max-batch 1`). Simulated
devices (one gRPC channel each, a batch of one per request) keep requests in flight against
one deployment at a time, the deployments taking turns round by round; the table gives the
median requests per second over the rounds next to the plan's prediction, and per tier, from
its /metrics over all rounds, the batch that formed and the slice's time per request next
to the plan's stage time (the plan prices the slices and links, not the serving around
them).

    python benchmarks/throughput_batching_plan.py [--costs profile|roofline] [--max-batch 8]
        [--threads 1] [--image 64] [--devices 8] [--in-flight 32] [--rounds 3] [--seconds 3]
        [--out DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import re
import statistics
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from benchmarks.runtime_batching import load
from wpk.console import make_console
from wpk.deploy.cli import build_parser as deploy_parser
from wpk.deploy.cli import batching_arguments, local_link, plan_batching_arguments
from wpk.deploy.local import LocalDeployment
from wpk.examples import resnet_like
from wpk.partitioner.cli import main as partition_main
from wpk.plan import load_plan
from wpk.profiling import profile_model, save_profile

TIERS = """# two tiers on this machine, fast links (with --threads 1, a core of two each)
tiers:
  - {name: device, preset: edge-cpu}
  - {name: edge, preset: edge-cpu}
links:
  - {from: device, to: edge, bandwidth: 10gbit, rtt: 0.1ms}
"""


def profiles(model: Path, batch: int, image: int, work: Path, threads: int, repeats: int = 3
             ) -> dict[int, Path]:
    """This machine's profile of `model` at batch 1 and at `batch` (`threads`, as served):
    `repeats` profiles of each, taken in turns so that both see the same changes in the
    machine's load, each node's time the median over them."""
    documents: dict[int, list[dict]] = {1: [], batch: []}
    for _ in range(repeats):
        for b in documents:
            documents[b].append(profile_model(
                model, threads=threads, name="here", progress=False, runs=30,
                input_shapes={"image": (b, 3, image, image)}))
    files = {}
    for b, taken in documents.items():
        combined = dict(taken[0])
        combined["nodes"] = [dict(node, ms=round(float(np.median(
            [d["nodes"][i]["ms"] for d in taken])), 6)) for i, node in enumerate(taken[0]["nodes"])]
        combined["total_ms"] = {"median": round(float(np.median(
            [d["total_ms"]["median"] for d in taken])), 6)}
        files[b] = save_profile(combined, work / f"profile-b{b}.json")
    return files


def plan(model: Path, tiers: Path, profiles: list[Path], batch: int, out: Path) -> Path:
    """wpk-partition for throughput, from `profiles` (none: the roofline, default
    efficiencies)."""
    args = [str(model), "--tiers-file", str(tiers), "--objective", "throughput", "-o", str(out)]
    if not profiles:
        args.append("--no-calibrate")
    for tier in ("device", "edge"):
        args += [arg for profile in profiles for arg in ("--profile", f"{tier}={profile}")]
    if batch > 1:
        args += ["--max-batch", str(batch)]
    print("wpk-partition", " ".join(args))
    assert partition_main(args) == 0
    return out


def deployment(plan_dir: Path, flags: list[str], threads: int) -> LocalDeployment:
    """As `wpk-deploy PLAN --local --threads THREADS FLAGS` starts the tiers."""
    args = deploy_parser().parse_args([str(plan_dir), "--local", "--threads", str(threads),
                                       *flags])
    loaded = load_plan(plan_dir)
    link = local_link(args, loaded, Console(file=io.StringIO()))
    return LocalDeployment(plan_dir, port=0, threads=threads, link=link, metrics=True,
                           serve_args=batching_arguments(args),
                           tier_args=plan_batching_arguments(args, loaded))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", choices=("profile", "roofline"), default="profile")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="ORT threads per tier")
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, help="keep the model, profiles and plans here")
    args = parser.parse_args()
    console = make_console()
    work = args.out or Path(tempfile.mkdtemp(prefix="wpk-batch-plan-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "resnet_like.onnx"
    onnx.save(resnet_like(image_size=args.image), str(model))
    tiers = work / "tiers.yaml"
    tiers.write_text(TIERS)
    files = profiles(model, args.max_batch, args.image, work, args.threads) \
        if args.costs == "profile" \
        else {}
    plans = {1: plan(model, tiers, [files[1]] if files else [], 1, work / "plan-b1"),
             args.max_batch: plan(model, tiers, list(files.values()), args.max_batch,
                                  work / f"plan-b{args.max_batch}")}
    runs = _runs(plans, args.max_batch)
    rates, tiers = _measure(runs, args, console)
    _table(runs, rates, tiers, args, console)


def _runs(plans: dict[int, Path], batch: int) -> dict[str, tuple[Path, list[str], float]]:
    """label -> (plan, wpk-deploy flags, predicted req/s)."""
    unbatched, batched = load_plan(plans[1]), load_plan(plans[batch])
    same_cuts = batched.predicted["batching"]["unbatched_same_cuts"]["throughput_rps"]
    return {
        "plan without --max-batch": (plans[1], [], unbatched.predicted["throughput_rps"]),
        f"plan with --max-batch {batch}": (plans[batch], [],
                                           batched.predicted["throughput_rps"]),
        f"plan with --max-batch {batch}, deployed with --max-batch 1":
            (plans[batch], ["--max-batch", "1"], same_cuts)}


def scrape(running: LocalDeployment) -> dict[str, dict[str, float]]:
    """Per tier: slice seconds (sum, count), batched runs and their rows, from /metrics."""
    found = {}
    for handle in running.tiers:
        text = urllib.request.urlopen(handle.metrics_url, timeout=5).read().decode()
        values = {}
        for name in ("wpk_slice_seconds_sum", "wpk_slice_seconds_count", "wpk_batches_total",
                     "wpk_batch_rows_total"):
            match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.MULTILINE)
            values[name] = float(match[1]) if match else 0.0
        found[handle.tier] = values
    return found


def _measure(runs, args, console) -> tuple[dict[str, list[float]], dict[str, dict]]:
    rates: dict[str, list[float]] = {label: [] for label in runs}
    started = {label: deployment(plan_dir, flags, args.threads).__enter__()
               for label, (plan_dir, flags, _) in runs.items()}
    before = {label: scrape(running) for label, running in started.items()}
    try:
        for round_ in range(args.rounds):
            order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
            for label in order:
                running = started[label]
                plan = running.plan
                feeds = {spec.name: np.random.default_rng(0).standard_normal(spec.shape)
                         .astype(spec.dtype) for spec in plan.model.inputs}
                rate = asyncio.run(load(running.entry, plan.name, feeds, args.devices,
                                        args.in_flight, args.seconds))
                rates[label].append(rate)
                console.print(f"round {round_ + 1}: {label}: {rate:.0f} req/s")
        after = {label: scrape(running) for label, running in started.items()}
    finally:
        for running in started.values():
            running.stop()
    tiers = {label: {tier: {k: after[label][tier][k] - before[label][tier][k]
                            for k in after[label][tier]} for tier in after[label]}
             for label in runs}
    return rates, tiers


def _per_tier(plan, counters: dict[str, dict[str, float]], batched: bool) -> list[str]:
    """'tier: batch formed, slice ms per request (planned)' for each tier with a slice;
    planned at the plan's batch when deployed `batched`, else a lone request's."""
    batching = plan.predicted.get("batching", {}).get("tiers", {}) if batched else {}
    cells = []
    for tier in plan.tiers:
        if not tier.slice:
            continue
        c = counters[tier.name]
        rows = c["wpk_batch_rows_total"] or c["wpk_slice_seconds_count"]
        formed = rows / c["wpk_batches_total"] if c["wpk_batches_total"] else 1.0
        measured = c["wpk_slice_seconds_sum"] / rows * 1e3 if rows else float("nan")
        planned = batching[tier.name]["stage_ms"] if tier.name in batching \
            else tier.predicted_compute_ms
        cells.append(f"{tier.name}: batch {formed:.1f}, {measured:.3f} ms ({planned:.3f})")
    return cells


def _table(runs, rates, tiers, args, console) -> None:
    table = Table(title=f"resnet_like {args.image}x{args.image}, two tiers on this machine, "
                        f"{args.devices} devices, {args.in_flight} in flight, costs from "
                        f"{args.costs}, {args.threads} ORT thread(s) per tier")
    for column in ("deployment", "tiers' max batch", "link", "predicted req/s",
                   "measured req/s (median)", "rounds", "measured / predicted",
                   "per tier: batch formed, slice ms per request (plan's stage ms)"):
        table.add_column(column)
    for label, (plan_dir, flags, predicted) in runs.items():
        running = deployment(plan_dir, flags, args.threads)
        batches = {t.name: (t.batch if running.tier_args else 1) for t in running.plan.tiers}
        median = statistics.median(rates[label])
        table.add_row(label, ", ".join(f"{k} {v}" for k, v in batches.items()), running.link,
                      f"{predicted:.0f}", f"{median:.0f}",
                      " ".join(f"{r:.0f}" for r in rates[label]), f"{median / predicted:.2f}",
                      "; ".join(_per_tier(running.plan, tiers[label],
                                          bool(running.tier_args))))
    console.print(table)


if __name__ == "__main__":
    main()
