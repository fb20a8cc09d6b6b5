"""`wpk-partition`: choose where to cut a model across tiers and write slices + plan.json."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from wpk import cli_args
from wpk.console import make_console
from wpk.errors import WpkError, cli_entry, flags_for, print_warning
from wpk.files import check_outputs, writable_file
from wpk.graph import Graph, parse_input_shapes
from wpk.partitioner import search
from wpk.plan import Plan
from wpk.partitioner.api import PartitionResult, execute
from wpk.partitioner.measured import measured_costs_from_args, warn_to_stderr
from wpk.partitioner.request import OBJECTIVES, PRIVACY_MODES, PartitionRequest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wpk-partition",
        description="Split an ONNX model across device, edge and cloud tiers so that "
                    "end-to-end latency (or throughput, or bytes beyond the edge) is best.")
    parser.add_argument("model", nargs="?",
                        help="the ONNX model file (none with --candidate)")
    parser.add_argument("--tiers", default=None,
                        help="tiers in flow order (default device,edge,cloud or the tiers file's)")
    parser.add_argument("--tiers-file", help="YAML file with tier hardware and links")
    parser.add_argument("--link", action="append", default=[], metavar="SRC-DST=BW,RTT",
                        help="override a link, e.g. device-edge=10mbit,5ms (repeatable)")
    parser.add_argument("--codec", action="append", default=[], metavar="SRC-DST=CODEC",
                        help="wire codec of a link: raw, fp16, int8, each optionally +zstd "
                             "(e.g. edge-cloud=fp16+zstd; lossy ones cost accuracy, see "
                             "docs/runtime.md)")
    parser.add_argument("--objective", choices=OBJECTIVES + ("accuracy",), default=None,
                        help="latency (default), throughput, bandwidth; with --candidate: "
                             "accuracy (default) or latency")
    parser.add_argument("--max-latency-ms", type=float, help="latency bound (SLO)")
    parser.add_argument("--max-batch", type=int, default=1, metavar="N",
                        help="with --objective throughput: many devices feed the tiers, and "
                             "each tier whose slice takes a batch runs batches of up to N "
                             "requests (wpk-serve --max-batch; wpk-deploy --local follows the "
                             "plan). Default 1: no batching")
    parser.add_argument("--candidate", action="append", default=[], metavar="MODEL:acc=N",
                        help="a candidate model and its accuracy (repeatable): plan each and "
                             "pick the most accurate that meets --max-latency-ms (or with "
                             "--objective latency the fastest at or above --min-acc)")
    parser.add_argument("--min-acc", type=float, metavar="N",
                        help="with --candidate: the lowest accuracy accepted")
    parser.add_argument("--privacy", choices=PRIVACY_MODES, default="raw-input-on-device",
                        help="raw-input-on-device (default): the model input never crosses a link")
    parser.add_argument("--max-leakage", metavar="METRIC=VALUE",
                        help="bound what leaves the device: every tensor crossing its link must "
                             "have dcor, psnr (dB) or ssim at most VALUE (e.g. dcor=0.3; see "
                             "docs/privacy.md)")
    parser.add_argument("--calibration-data", metavar="NPZ",
                        help="real inputs to measure leakage on: one array per model input, "
                             "samples first (without it: random inputs, labelled synthetic)")
    parser.add_argument("--leakage-samples", type=cli_args.positive_int, metavar="N",
                        help="measure leakage on the first N calibration samples")
    parser.add_argument("--deliver-to", metavar="TIER",
                        help="tier that needs the results (default: the first tier)")
    parser.add_argument("--pin", action="append", default=[], metavar="NODE=TIER",
                        help="force a node onto a tier (repeatable)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                        help="fix a dynamic input shape (repeatable)")
    parser.add_argument("--profile", action="append", default=[], metavar="TIER=FILE",
                        help="plan TIER with node times measured by wpk-profile; repeat a tier "
                             "for candidate machines")
    parser.add_argument("--latency-table", action="append", default=[], metavar="TIER=FILE",
                        help="plan TIER with node times predicted from a latency table "
                             "(wpk-profile --ops on its machine); repeat a tier for "
                             "candidate machines")
    parser.add_argument("--profile-local", metavar="TIER",
                        help="profile the model on this machine and use it for TIER")
    parser.add_argument("--top", type=cli_args.non_negative_int, default=0, metavar="N",
                        help="print up to N best configurations (each candidate machine's "
                        "optimum and next-best cuts beside the plan's)")
    parser.add_argument("--pareto", action="store_true",
                        help="print the latency / bytes-beyond-edge front (and, with leakage "
                             "measured, the latency / leakage front)")
    parser.add_argument("-o", "--output", help="output directory (default: <model>_plan)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier plan, slices or report at the outputs")
    parser.add_argument("--report", metavar="PNG", help="draw per-layer costs and the cuts")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking the chained slices against the whole model")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="use default roofline efficiencies instead of measuring this machine")
    parser.add_argument("--json", action="store_true", help="print plan.json instead of tables")
    return parser


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise WpkError(f"bad {flag} {item!r}: expected KEY=VALUE")
        pairs.append((key, value))
    return pairs


def _pins(items: list[str]) -> dict[str, str]:
    """--pin NODE=TIER pairs; one node pinned to two tiers is a mistake, not a choice."""
    pins: dict[str, str] = {}
    for node, tier in _pairs(items, "--pin"):
        if pins.get(node, tier) != tier:
            raise WpkError(f"--pin {node}={tier}: {node!r} is already pinned to "
                           f"{pins[node]!r}")
        pins[node] = tier
    return pins


def _tier_names(args: argparse.Namespace) -> list[str] | None:
    """--tiers a,b,c; the default three tiers when neither it nor a tiers file is given."""
    if args.tiers is None:
        return None if args.tiers_file is not None else ["device", "edge", "cloud"]
    names = [t.strip() for t in args.tiers.split(",")]
    if not all(names):
        raise WpkError(f"--tiers {args.tiers!r}: an empty tier name (expected names "
                       f"separated by commas, like device,edge,cloud)")
    return names


def request_from_args(args: argparse.Namespace, graph: Graph | None = None,
                      model_file: str | None = None) -> PartitionRequest:
    """The one place the command line becomes a request (cost files are read here);
    `graph` (of `model_file`) stands in for the model argument (a candidate's)."""
    tier_names = _tier_names(args)
    model_file = model_file or args.model
    graph = graph or Graph.load(model_file, parse_input_shapes(args.input_shape))
    profiles = _pairs(args.profile, "--profile")
    tables = _pairs(args.latency_table, "--latency-table")
    # warnings go with the tables, or to stderr when stdout carries JSON
    extra = {"warn": warn_to_stderr} if args.json else {}
    measured = measured_costs_from_args(graph, profiles, args.profile_local, args.input_shape,
                                        batch=max(args.max_batch, 1), tables=tables, **extra)
    return PartitionRequest(
        model=graph, tiers=tier_names, tiers_file=args.tiers_file, links=args.link,
        codecs=args.codec, objective=args.objective or "latency",
        max_latency_ms=args.max_latency_ms, privacy=args.privacy,
        deliver_to=args.deliver_to, pins=_pins(args.pin), max_batch=args.max_batch,
        measured=measured, use_calibration=not args.no_calibrate,
        out_dir=Path(args.output) if args.output else Path(f"{Path(model_file).stem}_plan"),
        verify=not args.no_verify, force=args.force,
        other_inputs=[path for _tier, path in profiles + tables] + (
            [args.calibration_data] if args.calibration_data else []),
        top=args.top, with_front=args.pareto, max_leakage=args.max_leakage,
        calibration_data=args.calibration_data, leakage_samples=args.leakage_samples)


def _check_model_arguments(args: argparse.Namespace) -> None:
    """One model or candidates, and the flags that only candidates take."""
    if args.candidate:
        if args.model:
            raise WpkError(f"give the model either as the argument ({args.model}) or as "
                           f"--candidate, not both")
        return
    if not args.model:
        raise WpkError("name the model to partition (or give --candidate models)")
    if args.objective == "accuracy" or args.min_acc is not None:
        flag = "--min-acc" if args.min_acc is not None else "--objective accuracy"
        raise WpkError(f"{flag} chooses among --candidate models; with one model there is "
                       f"nothing to choose")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _tier_names(args)    # a bad --tiers is refused before the report check
    _check_model_arguments(args)
    report = None
    if args.report:  # checked before the search, so that its work is not lost at the end
        from wpk.partitioner.report import report_path

        report = writable_file(report_path(args.report), "report")
        check_outputs([report], [args.model, args.tiers_file, *args.candidate],
                      force=args.force)
    with flags_for():   # the request's checks name the flags that set them
        if args.candidate:
            from wpk.partitioner.candidate_cli import choose_candidate

            request, result = choose_candidate(args)
        else:
            request = request_from_args(args)
            result = execute(request)
    if args.json:
        print(json.dumps(result.plan.to_json(), indent=2))
    else:
        print_result(result, make_console())
    if report is not None:
        from wpk.partitioner.report import draw_report

        draw_report(result, report)
        print(f"report: {report}", file=sys.stderr if args.json else sys.stdout)
    stale = Path(request.out_dir) / "optimized"   # wpk-optimize's output for the replaced plan
    if stale.is_dir() and any(stale.iterdir()):
        print_warning(f"{stale}: optimized slices of the previous plan in this directory; the "
                      f"new plan does not use them (run wpk-optimize again)")
    return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def print_result(result: PartitionResult, console: Console) -> None:
    plan = result.plan
    console.print(f"[bold]{plan.name}[/]: {len(result.graph.nodes)} nodes, "
                  f"{result.graph.total_flops / 1e9:.2f} GFLOP; objective "
                  f"[bold]{result.objective}[/], privacy {plan.objective.privacy}, "
                  f"results to {plan.objective.deliver_to}")
    console.print(_tiers_table(plan))
    if plan.links:
        console.print(_links_table(plan))
    _print_leakage(plan, console)
    computing = [tier for tier in plan.tiers if tier.nodes]
    if len(computing) == 1:
        console.print(f"One tier is best for everything: all {len(result.graph.nodes)} nodes "
                      f"run on [bold]{computing[0].name}[/]; the plan has one slice.")
    _print_predictions(result, console)
    if plan.objective.max_batch > 1:
        _print_batching(plan, console)
    if plan.verification:
        v = plan.verification
        console.print(f"verified: chained slices match the whole model on {v['samples']} random "
                      f"inputs (max abs error {v['max_abs_error']:.2e}, rtol {v['rtol']}, "
                      f"atol {v['atol']})")
    if result.top:
        _print_top(result, console)
    if result.front:
        console.print(_front_table(result))
    if result.leakage_front:
        console.print(_leakage_front_table(result))
    if result.out_dir is not None:
        console.print(f"wrote {result.out_dir}/plan.json and "
                      f"{', '.join(t.slice for t in plan.tiers if t.slice)}")


def _tiers_table(plan: Plan) -> Table:
    tiers = Table(title="tiers", title_justify="left")
    for column in ("tier", "machine", "times from", "ops", "compute ms", "bytes out"):
        tiers.add_column(column, justify="right" if column in ("ops", "compute ms", "bytes out")
                         else "left")
    for tier in plan.tiers:
        out_bytes = sum(plan.tensor_spec(t).nbytes for t in tier.forward)
        tiers.add_row(tier.name, tier.machine or tier.hardware.get("hardware", "custom"),
                      tier.cost_source, str(len(tier.nodes)), f"{tier.predicted_compute_ms:.3f}",
                      _bytes(out_bytes))
    return tiers


def _links_table(plan: Plan) -> Table:
    links = Table(title="links", title_justify="left")
    for column in ("link", "bandwidth", "RTT", "codec", "tensors", "bytes out",
                   "bytes back", "transfer ms"):
        links.add_column(column, justify="left" if column in ("link", "tensors") else "right")
    for link in plan.links:
        via = f" (via {', '.join(link.via)})" if link.via else ""
        links.add_row(f"{link.src} -> {link.dst}{via}", f"{link.bandwidth_mbps:g} Mbit/s",
                      f"{link.rtt_ms:g} ms", link.codec, ", ".join(link.tensors) or "-",
                      _bytes(link.bytes), _bytes(link.return_bytes),
                      f"{link.predicted_transfer_ms:.3f}")
    return links


def _print_leakage(plan: Plan, console: Console) -> None:
    """What the tensors leaving the device give away about the input, when measured."""
    source = plan.objective.leakage_data
    if source is None:
        return
    label = "SYNTHETIC random inputs" if source == "synthetic" else source
    bound = f", bound {plan.objective.max_leakage}" if plan.objective.max_leakage else ""
    figures = [(name, f) for link in plan.links for name, f in (link.leakage or {}).items()]
    if not figures:
        console.print(f"leakage ({label}{bound}): nothing leaves the device")
    for name, f in figures:
        console.print(f"leakage of {name} leaving the device ({label}{bound}): dCor "
                      f"{f['dcor']:.3f} [{f['dcor_low']:.2f}, {f['dcor_high']:.2f}], "
                      f"reconstruction PSNR {f['psnr_db']:.1f} dB, SSIM {f['ssim']:.3f}")


def _print_predictions(result: PartitionResult, console: Console) -> None:
    """The predicted latency and throughput, against the best single tier allowed."""
    predicted = result.plan.predicted
    best_single = predicted["best_single_tier"]
    line = f"end-to-end latency [bold]{predicted['latency_ms']:.3f} ms[/]"
    if best_single:
        base = predicted["single_tier_latency_ms"][best_single]
        line += (f" vs {base:.3f} ms all on {best_single} (best single tier allowed): "
                 f"{base / predicted['latency_ms']:.2f}x")
    console.print(line)
    if result.objective == "throughput":
        allowed = {name: ev for name, ev in result.single_tier.items()
                   if search.feasible(result.problem, ev.tiers)}
        if allowed:
            name = min(allowed, key=lambda k: allowed[k].bottleneck_ms)
            base_ms = allowed[name].bottleneck_ms
            console.print(f"slowest stage [bold]{predicted['bottleneck_ms']:.3f} ms[/] vs "
                          f"{base_ms:.3f} ms all on {name} (best single tier allowed): "
                          f"{base_ms / predicted['bottleneck_ms']:.2f}x the throughput")
    others = ", ".join(f"{k} {v:.3f} ms" for k, v in predicted["single_tier_latency_ms"].items())
    console.print(f"all on one tier: {others}")
    console.print(f"throughput {predicted['throughput_rps']} req/s (slowest stage "
                  f"{predicted['bottleneck_stage']}, {predicted['bottleneck_ms']:.3f} ms); "
                  f"bytes beyond the edge {_bytes(predicted['bytes_beyond_edge'])} vs raw input "
                  f"{_bytes(predicted['raw_input_bytes'])}")


def _print_batching(plan: Plan, console: Console) -> None:
    """Per tier the batch assumed and its requests/s; the throughput with and without."""
    batching = plan.predicted["batching"]
    table = Table(title=f"dynamic batching: up to {batching['max_batch']} requests per run",
                  title_justify="left")
    for column in ("tier", "batch", "ms per request", "req/s", "why batch 1"):
        table.add_column(column, justify="left" if column in ("tier", "why batch 1")
                         else "right")
    for name, tier in batching["tiers"].items():
        rate = tier["throughput_rps"]
        table.add_row(name, str(tier["batch"]), f"{tier['stage_ms']:.3f}",
                      f"{rate:.1f}" if rate else "-", tier["why_batch_1"] or "")
    console.print(table)
    same, alone = batching["unbatched_same_cuts"], batching["unbatched_best"]
    with_batching = plan.predicted["throughput_rps"]
    line = (f"throughput with batching [bold]{with_batching} req/s[/] (slowest stage "
            f"{plan.predicted['bottleneck_stage']}); without batching: these cuts "
            f"{same['throughput_rps']} req/s (slowest {same['bottleneck_stage']}), the best "
            f"unbatched plan {alone['throughput_rps']} req/s")
    if with_batching and alone["throughput_rps"]:
        line += f": {with_batching / alone['throughput_rps']:.2f}x with batching"
    console.print(line)


def _front_table(result: PartitionResult) -> Table:
    front = Table(title="latency / bytes beyond the edge (Pareto front)", title_justify="left")
    for column in ("latency ms", "bytes beyond edge", "cut (nodes per tier)"):
        front.add_column(column, justify="right")
    for point in result.front:
        counts = [int((point.tiers == i).sum()) for i in range(len(result.tiers))]
        front.add_row(f"{point.latency_ms:.3f}", _bytes(point.bytes_beyond_edge),
                      " / ".join(f"{t.name} {c}" for t, c in zip(result.tiers.tiers, counts)))
    return front


def _leakage_front_table(result: PartitionResult) -> Table:
    metric = result.leakage_metric
    front = Table(title=f"latency / leakage leaving the device (front, {metric})",
                  title_justify="left")
    for column in ("latency ms", f"highest {metric} leaving the device", "cut (nodes per tier)"):
        front.add_column(column, justify="right")
    for latency, worst, tiers in result.leakage_front:
        counts = [int((tiers == i).sum()) for i in range(len(result.tiers))]
        front.add_row(f"{latency:.3f}", "nothing leaves" if worst is None else f"{worst:.3f}",
                      " / ".join(f"{t.name} {c}" for t, c in zip(result.tiers.tiers, counts)))
    return front


def _print_top(result: PartitionResult, console: Console) -> None:
    table = Table(title=f"top {len(result.top)} configurations", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("machines")
    table.add_column("cut (nodes per tier)")
    table.add_column("latency ms", justify="right")
    table.add_column("bottleneck ms", justify="right")
    table.add_column("bytes out per tier", justify="right")
    table.add_column("")
    for rank, config in enumerate(result.top, 1):
        e = config.evaluation
        machines = ", ".join(f"{m.tier}={m.machine}" for m in config.machines if m.machine) or "-"
        counts = [int((e.tiers == i).sum()) for i in range(len(result.tiers))]
        cut = " / ".join(f"{t.name} {c}" for t, c in zip(result.tiers.tiers, counts))
        bytes_out = " / ".join(_bytes(b) for b in e.forward_bytes)
        is_plan = all(a is b for a, b in zip(config.machines, result.best.machines)) and \
            (e.tiers == result.best.evaluation.tiers).all()
        table.add_row(str(rank), machines, cut, f"{e.latency_ms:.3f}", f"{e.bottleneck_ms:.3f}",
                      bytes_out or "-", "the plan" if is_plan else "")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
