"""`wpk-nas`: a training-free, partition-aware architecture search over the `mbconv` space.

    wpk-nas --space mbconv --tiers device,edge,cloud --latency-table device=pi4-ops.json \
        --latency-table edge=box-ops.json --max-latency-ms 30 -o nas/

Every architecture is priced by the tiers' latency tables (or the roofline) under its best
plan across the tiers, and scored by the NASWOT proxy; NSGA-II keeps the trade-off. Writes
the Pareto set as untrained ONNX models with their plans, `pareto.json`, and prints them
next to MobileNetV2 (the same space's fixed network). `--measure TIER` times each member's
TIER slice here with ONNX Runtime (this machine standing for TIER).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from wpk import cli_args
from wpk.errors import WpkError, cli_entry
from wpk.files import check_outputs
from wpk.graph import Graph
from wpk.optimizer.nas_proxy import DEFAULT_BATCH, DEFAULT_IMAGE
from wpk.optimizer.nas_search import Evaluated, Evaluator, search
from wpk.optimizer.nas_space import WIDTHS, build, mobilenet_v2
from wpk.partitioner.costs import Efficiency, calibrate
from wpk.partitioner.measured import measured_costs_from_args
from wpk.partitioner.request import PartitionRequest

SPACES = ("mbconv",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wpk-nas", description=__doc__.splitlines()[0])
    parser.add_argument("--space", choices=SPACES, default="mbconv")
    parser.add_argument("--tiers", default="device,edge,cloud")
    parser.add_argument("--tiers-file", help="YAML file with tier hardware and links")
    parser.add_argument("--link", action="append", default=[], metavar="SRC-DST=BW,RTT")
    parser.add_argument("--latency-table", action="append", default=[], metavar="TIER=FILE",
                        help="price TIER from a latency table (wpk-profile --ops); repeat a "
                             "tier for candidate machines")
    parser.add_argument("--max-latency-ms", type=cli_args.positive_float,
                        help="latency goal of the partitioned network")
    parser.add_argument("-o", "--output", default="nas", help="output directory (default: nas)")
    parser.add_argument("--population", type=cli_args.positive_int, default=16)
    parser.add_argument("--generations", type=cli_args.positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=cli_args.positive_int, default=224,
                        help="input resolution of the networks (default: 224)")
    parser.add_argument("--proxy-size", type=cli_args.positive_int, default=DEFAULT_IMAGE,
                        help=f"resolution the proxy is computed at (default: {DEFAULT_IMAGE})")
    parser.add_argument("--proxy-batch", type=cli_args.positive_int, default=DEFAULT_BATCH)
    parser.add_argument("--measure", metavar="TIER",
                        help="time each member's TIER slice here (this machine as TIER)")
    parser.add_argument("--threads", type=cli_args.threads, default=None,
                        help="intra-op threads for --measure (default: the table's)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="default roofline efficiencies for tiers without a table")
    parser.add_argument("--force", action="store_true", help="replace an earlier result")
    return parser


def _request_factory(args: argparse.Namespace):
    tables = [tuple(item.split("=", 1)) for item in args.latency_table]
    if any(len(pair) != 2 or not all(pair) for pair in tables):
        raise WpkError("bad --latency-table: expected TIER=FILE")
    efficiency = Efficiency() if args.no_calibrate else calibrate()
    tiers = [t.strip() for t in args.tiers.split(",")]

    def request_for(graph: Graph) -> PartitionRequest:
        measured = measured_costs_from_args(graph, (), None, tables=tables,
                                            warn=lambda message: None)
        return PartitionRequest(model=graph, tiers=tiers, tiers_file=args.tiers_file,
                                links=args.link, measured=measured, efficiency=efficiency,
                                verify=False)
    return request_for, [path for _, path in tables]


def _measure_slice(member: Evaluated, tier: str, threads: int | None) -> float:
    """The member's `tier` slice timed here (median of 20 runs), plus the plan's other
    tiers' predicted compute and its transfers: ms."""
    import onnxruntime as ort

    from wpk.feeds import random_feeds
    from wpk.partitioner import slicing

    result = member.result
    evaluation = result.best.evaluation
    index = result.tiers.index(tier)
    total = float(evaluation.latency_ms - evaluation.compute_ms[index])
    piece = next((p for p in result.pieces if p.tier == index and p.slice_outputs), None)
    if piece is None:
        return total
    model = slicing.slice_model(result.graph, piece, tier)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    weights = {i.name for i in model.graph.initializer}
    feeds = random_feeds({i.name: ([d.dim_value for d in i.type.tensor_type.shape.dim],
                                   np.float32)
                          for i in model.graph.input if i.name not in weights}, seed=0)
    for _ in range(5):
        session.run(None, feeds)
    walls = []
    for _ in range(20):
        start = time.perf_counter()
        session.run(None, feeds)
        walls.append((time.perf_counter() - start) * 1000)
    return total + float(np.median(walls))


def _reference(evaluate: Evaluator, front: list[Evaluated]) -> Evaluated:
    """MobileNetV2 at the width whose predicted latency is closest to the Pareto set's
    median: the fixed network to compare the set with."""
    target = float(np.median([p.latency_ms for p in front]))
    return min((evaluate(mobilenet_v2(w)) for w in WIDTHS),
               key=lambda p: abs(p.latency_ms - target))


def _write(front: list[Evaluated], reference: Evaluated, out: Path, args: argparse.Namespace,
           request_for) -> list[dict]:
    """Each member's model and plan, and `pareto.json`."""
    from wpk.partitioner.api import execute

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    reference_name = f"mobilenet_v2_w{WIDTHS[reference.arch.width]:g}"
    members = front + ([] if any(m is reference for m in front) else [reference])
    for rank, member in enumerate(members):
        name = reference_name if member is reference else f"arch_{rank:02d}"
        model_path = out / f"{name}.onnx"
        import onnx

        onnx.save(build(member.arch, args.image_size, seed=args.seed, name=name),
                  str(model_path))
        graph = Graph.load(model_path)
        execute(replace(request_for(graph), out_dir=out / f"{name}_plan", verify=True,
                        force=True, max_latency_ms=None))
        row = {"name": name, "architecture": member.arch.describe(),
               "genes": member.arch.genes(), "params": member.params,
               "predicted_latency_ms": round(member.latency_ms, 4),
               "proxy": round(member.score, 4), "model": model_path.name,
               "plan": f"{name}_plan", "reference": member is reference}
        if args.measure:
            row["measured_latency_ms"] = round(
                _measure_slice(member, args.measure, args.threads), 4)
        rows.append(row)
    (out / "pareto.json").write_text(json.dumps(
        {"space": args.space, "tiers": args.tiers, "max_latency_ms": args.max_latency_ms,
         "measured_tier": args.measure, "members": rows}, indent=1) + "\n")
    return rows


def _print(rows: list[dict], bound: float | None) -> None:
    from rich.table import Table

    from wpk.console import make_console

    table = Table(title="Pareto set (predicted partitioned latency vs NASWOT proxy)",
                  title_justify="left")
    measured = any("measured_latency_ms" in r for r in rows)
    for column in ("name", "predicted ms", *(["measured ms"] if measured else []), "proxy",
                   "params", "architecture"):
        table.add_column(column, justify="left" if column in ("name", "architecture")
                         else "right")
    for r in rows:
        table.add_row(r["name"], f"{r['predicted_latency_ms']:.3f}",
                      *([f"{r.get('measured_latency_ms', float('nan')):.3f}"] if measured else []),
                      f"{r['proxy']:.2f}", f"{r['params'] / 1e6:.2f} M", r["architecture"])
    console = make_console()
    console.print(table)
    if bound is not None:
        console.print(f"latency goal {bound:g} ms; mobilenet_v2_w*: MobileNetV2 at the width "
                      f"closest in latency (shown whether or not it is on the Pareto set)")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    check_outputs([out / "pareto.json"], [], force=args.force)
    request_for, table_files = _request_factory(args)
    if args.measure and args.measure not in [t.strip() for t in args.tiers.split(",")]:
        raise WpkError(f"--measure {args.measure}: not one of the tiers ({args.tiers})")
    evaluate = Evaluator(request_for, args.image_size, args.proxy_size, args.proxy_batch,
                         args.seed)
    front = search(evaluate, args.max_latency_ms, args.population, args.generations,
                   args.seed, progress=lambda g, n: print(
                       f"generation {g}/{n}: {len(evaluate.seen)} architectures evaluated",
                       file=sys.stderr))
    if not front:
        fastest = min(evaluate.seen.values(), key=lambda p: p.latency_ms)
        raise WpkError(f"no architecture found meets --max-latency-ms {args.max_latency_ms:g}:"
                       f" the fastest evaluated takes {fastest.latency_ms:.2f} ms")
    rows = _write(front, _reference(evaluate, front), out, args, request_for)
    _print(rows, args.max_latency_ms)
    print(f"wrote {out}/pareto.json, {len(front)} models and their plans "
          f"(tables: {', '.join(table_files) or 'none, roofline estimates'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
