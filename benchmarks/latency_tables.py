"""How well a latency table predicts models it was not built from, and what that does to plans.

    python benchmarks/latency_tables.py [--threads 1] [--rounds 3] [--torch] [--only A,B]
                                        [--markdown docs/measurements/DATE-latency-tables.md]

1. The default operator grid is timed here (`wpk-profile --ops`), `--rounds` passes; after
   each pass every model of the conformance corpus is profiled once (`wpk-profile`), so that
   a busy minute on a shared machine hits the table and the profiles alike. A model's
   measured time is its lowest median over the rounds (the table keeps each operator's
   lowest median too): other programs only ever slow a measurement down.
2. Whole models: the time predicted from the table against the measured one.
3. Plans: this machine stands for the edge (or the device), priced once from the table and
   once from the profile; the other tiers are the presets' roofline estimates (the same
   both times), over several link bandwidths (`SCENARIOS`). The plan made from predicted
   times is evaluated with the measured times and compared with the plan made from
   measured times.
The corpus is `benchmarks/zoo_corpus.py` (and with --torch the torchvision/transformers
exports of `benchmarks/zoo_torch.py`, TorchScript exporter only): models nobody here wrote;
the table never saw them. The calibration networks of the table are wpk's own examples.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.zoo_corpus import MissingModel, ZooModel, corpus  # noqa: E402
from wpk.errors import WpkError  # noqa: E402
from wpk.graph import Graph  # noqa: E402
from wpk.op_bench import time_operators  # noqa: E402
from wpk.op_predict import Predictor  # noqa: E402
from wpk.op_table import OpTable, save_table  # noqa: E402
from wpk.partitioner.api import execute  # noqa: E402
from wpk.partitioner.costs import Efficiency, measured_costs  # noqa: E402
from wpk.partitioner.request import PartitionRequest  # noqa: E402
from wpk.partitioner import search  # noqa: E402
from wpk.profile_format import Profile  # noqa: E402
from wpk.profiling import profile_model  # noqa: E402

# (tier this machine stands for, links): the other tiers keep the presets' roofline
# estimates (device: a Raspberry-Pi-4-class CPU, edge: a 16-core server, cloud: a GPU)
SCENARIOS = [("edge", ("device-edge=20mbit,5ms", f"edge-cloud={bw}mbit,20ms"))
             for bw in (10, 50, 200)] + \
            [("device", (f"device-edge={bw}mbit,5ms", "edge-cloud=100mbit,20ms"))
             for bw in (10, 100)]
GOAL_WHOLE = 0.15        # predicted whole-model time within 15 % of measured
GOAL_PLAN = 0.05         # predicted plan within 5 % of the measured plan (measured times)


@dataclass
class Subject:
    """One corpus model, its graph, and its profiles (one per round)."""

    model: ZooModel
    path: Path
    graph: Graph
    profiles: list[dict] = field(default_factory=list)

    @property
    def best(self) -> dict:
        """The round with the lowest whole-model median."""
        return min(self.profiles, key=lambda p: p["total_ms"]["median"])


def subjects(models: list[ZooModel], work: Path) -> list[Subject]:
    found = []
    for model in models:
        try:
            cached = work / f"{model.name}.onnx"      # a torch export made by an earlier run
            path = cached if model.group == "torch" and cached.exists() else model.make(work)
            graph = Graph.load(path, model.input_shapes or None)
        except (MissingModel, WpkError) as missing:   # silero_vad: wpk's expected refusal
            print(f"skipped {model.name}: {missing}", file=sys.stderr)
            continue
        found.append(Subject(model, path, graph))
    return found


LOADS: list[float] = []      # the machine's 1-minute load average after each round


def measure(items: list[Subject], threads: int, rounds: int) -> dict:
    """The table, with every model profiled once after each of its passes."""
    def profile_all(round_: int) -> None:
        for item in items:
            item.profiles.append(profile_model(
                item.path, threads=threads, progress=False, name="here",
                input_shapes=item.model.input_shapes or None))
        LOADS.append(os.getloadavg()[0])
        print(f"round {round_ + 1}/{rounds}: table pass and {len(items)} profiles, load "
              f"average {LOADS[-1]:.1f}", file=sys.stderr)

    return time_operators("default", threads=threads, progress=False, name="here",
                          rounds=rounds, between_rounds=profile_all)


@dataclass
class WholeRow:
    name: str
    nodes: int
    measured_ms: float
    predicted_ms: float
    unscaled_ms: float           # without the table's in-network scale
    scale: float                 # the in-network scale used for this model
    stand_ins: dict[str, str]

    @property
    def ratio(self) -> float:
        return self.predicted_ms / self.measured_ms


def whole_models(table: OpTable, items: list[Subject]) -> list[WholeRow]:
    predictor = Predictor(table)
    unscaled = Predictor(table, calibrated=False)
    rows = []
    for item in items:
        prediction = predictor.predict(item.graph)
        plain = unscaled.predict(item.graph)
        rows.append(WholeRow(item.model.name, len(item.graph.nodes),
                             item.best["total_ms"]["median"], prediction.total_ms,
                             plain.total_ms, predictor.scale, prediction.stand_ins))
    return rows


@dataclass
class PlanRow:
    name: str
    tier: str                        # the tier this machine stood for
    links: str
    measured_plan_ms: float          # the plan from measured times, measured times
    predicted_plan_ms: float         # the plan from predicted times, measured times
    predicted_says_ms: float         # the plan from predicted times, as it predicted itself
    same_cut: bool

    @property
    def ratio(self) -> float:
        return self.predicted_plan_ms / self.measured_plan_ms


def _plan(item: Subject, node_ms: np.ndarray, source: str, tier: str, links: tuple[str, ...]):
    request = PartitionRequest(
        model=item.graph, tiers=["device", "edge", "cloud"], links=list(links),
        measured={tier: [measured_costs(tier, node_ms, source)]},
        efficiency=Efficiency(), verify=False)
    return execute(request)


def plans(table: OpTable, items: list[Subject]) -> list[PlanRow]:
    predictor = Predictor(table)
    rows = []
    for item in items:
        predicted = predictor.predict(item.graph).node_ms
        measured = np.array(Profile.from_document(item.best).node_times_for(item.graph))
        for tier, links in SCENARIOS:
            try:
                truth = _plan(item, measured, "measured", tier, links)
                guess = _plan(item, predicted, "predicted", tier, links)
            except Exception as error:   # a model the partitioner refuses: say so, go on
                print(f"{item.model.name}: no plan ({error})", file=sys.stderr)
                break
            tiers = guess.best.evaluation.tiers
            evaluated = search.evaluate(truth.best.problem, tiers)
            rows.append(PlanRow(item.model.name, tier, ", ".join(links),
                                truth.best.evaluation.latency_ms,
                                evaluated.latency_ms, guess.best.evaluation.latency_ms,
                                bool((tiers == truth.best.evaluation.tiers).all())))
    return rows


def _scales(table: OpTable) -> str:
    fit = table.footprint
    if fit is None:
        return f"{table.scale:.3f}"
    low, high = (np.exp(fit["intercept"] + fit["slope"] * (x - fit["center"]))
                 for x in (fit["low"], fit["high"]))
    return (f"{low:.3f} at {10 ** fit['low'] / 1e6:.0f} MB touched per run to {high:.3f} at "
            f"{10 ** fit['high'] / 1e6:.0f} MB")


def _summary(table: OpTable, whole: list[WholeRow], planned: list[PlanRow]) -> list[str]:
    errors = np.array([abs(r.ratio - 1) for r in whole])
    unscaled = np.array([abs(r.unscaled_ms / r.measured_ms - 1) for r in whole])
    plan_ratios = np.array([r.ratio for r in planned])
    loo = np.concatenate(list(Predictor(table).leave_one_out().values()))
    return [
        f"- Table: {len(table.entries)} points, in-network scale {_scales(table)}; "
        f"leave-one-out error of single operators: median {np.median(abs(loo - 1)):.1%}, "
        f"90th percentile {np.percentile(abs(loo - 1), 90):.1%}.",
        f"- Whole models ({len(whole)}): within {GOAL_WHOLE:.0%} of measured: "
        f"{(errors <= GOAL_WHOLE).sum()} of {len(whole)}; |error| median {np.median(errors):.1%}, "
        f"90th percentile {np.percentile(errors, 90):.1%}, worst {errors.max():.1%} "
        f"(without the in-network scale: {(unscaled <= GOAL_WHOLE).sum()} within, median "
        f"{np.median(unscaled):.1%}).",
        f"- Plans ({len(planned)} cases: models x {len(SCENARIOS)} tier and link settings): "
        f"the plan from predicted times, "
        f"timed with measured times, within {GOAL_PLAN:.0%} of the measured plan in "
        f"{(plan_ratios <= 1 + GOAL_PLAN).sum()} of {len(planned)}; the same cut in "
        f"{sum(r.same_cut for r in planned)}; median {np.median(plan_ratios):.3f}x, "
        f"worst {plan_ratios.max():.3f}x.",
    ]


def markdown(table: OpTable, whole: list[WholeRow], planned: list[PlanRow],
             command: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    keep = ("Model name", "CPU(s):", "Thread(s) per core", "L2 cache", "L3 cache",
            "Hypervisor vendor")
    machine = "\n".join(line for line in lscpu.splitlines() if line.startswith(keep))
    lines = [f"# Latency tables: predicted vs measured ({dt.date.today():%Y-%m-%d})", "",
             f"Commit `{commit}`, command `{command}`, Python {platform.python_version()}.",
             "", "Machine (`lscpu`, shared with other work: interleaved rounds, lowest medians;"
             f" 1-minute load average after each round: "
             f"{', '.join(f'{load:.1f}' for load in LOADS)} on {os.cpu_count()} CPUs):",
             "", "```", machine, "```", "", "## Summary", "", *_summary(table, whole, planned),
             "", "## Whole models", "",
             "| model | nodes | measured ms | predicted ms | ratio | scale | ratio without "
             "scale | stand-ins |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(whole, key=lambda r: r.ratio):
        stand = ", ".join(f"{k} as {v}" for k, v in sorted(r.stand_ins.items())) or ""
        lines.append(f"| {r.name} | {r.nodes} | {r.measured_ms:.3f} | {r.predicted_ms:.3f} | "
                     f"{r.ratio:.3f} | {r.scale:.3f} | {r.unscaled_ms / r.measured_ms:.3f} | "
                     f"{stand} |")
    lines += ["", "## Plans from predicted vs measured times", "",
              "This machine stands for one tier, priced from the table (predicted) or from the "
              "profile (measured); the other tiers are the presets' roofline estimates.", "",
              "| model | this machine as | links | measured plan ms | predicted plan, "
              "measured ms | ratio | predicted plan, its own estimate ms | same cut |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in planned:
        lines.append(f"| {r.name} | {r.tier} | {r.links} | {r.measured_plan_ms:.3f} | "
                     f"{r.predicted_plan_ms:.3f} | {r.ratio:.3f} | {r.predicted_says_ms:.3f} | "
                     f"{'yes' if r.same_cut else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch", action="store_true", help="add the torch exports")
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--work", help="where corpus files are made (default: a temp dir)")
    parser.add_argument("--table", help="also save the table here")
    parser.add_argument("--markdown", help="write the report here")
    args = parser.parse_args(argv)
    models = corpus()
    if args.torch:
        from benchmarks.zoo_torch import torch_corpus

        models += [m for m in torch_corpus() if m.name.endswith("_torchscript")]
    if args.only:
        models = [m for m in models if m.name in args.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        items = subjects(models, Path(args.work or tmp))
        document = measure(items, args.threads, args.rounds)
    if args.table:
        save_table(document, args.table)
    table = OpTable.from_document(document)
    whole, planned = whole_models(table, items), plans(table, items)
    command = "python benchmarks/latency_tables.py " + " ".join(argv or sys.argv[1:])
    report = markdown(table, whole, planned, command)
    if args.markdown:
        Path(args.markdown).write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
