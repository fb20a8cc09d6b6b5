"""`wpk-profile`: measure every node of a model on this machine and write a profile file.

Run it on each machine you partition for (a Raspberry Pi, a Jetson, an edge server, a cloud
VM), copy the files back, and plan with `wpk-partition --profile TIER=FILE`. With `--ops`
it times a grid of single operators instead and writes a latency table, from which any
model's times on this machine are predicted (`wpk-partition --latency-table TIER=FILE`).
Needs only the core dependencies (onnx, onnxruntime, numpy, jsonschema, rich).
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from wpk import cli_args
from wpk.errors import WpkError, cli_entry, flags_for
from wpk.files import check_outputs
from wpk.graph import parse_input_shapes
from wpk.op_bench import DEFAULT_ROUNDS
from wpk.op_grid import GRIDS
from wpk.profiling import (DEFAULT_RUNS, DEFAULT_WARMUP, PROVIDER_ALIASES, profile_model,
                           save_profile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wpk-profile", description=__doc__.splitlines()[0],
        epilog="examples: wpk-profile model.onnx -o pi4.json --name pi4 --threads 4; "
               "wpk-profile --ops -o pi4-ops.json --name pi4")
    parser.add_argument("model", nargs="?",
                        help="the ONNX model (the same file you will partition); none with --ops")
    parser.add_argument("--ops", action="store_true",
                        help="time a grid of single operators and write a latency table "
                             "(docs/op-tables.md) instead of profiling a model")
    parser.add_argument("--grid", choices=GRIDS, default="default",
                        help="with --ops: the default grid (a few minutes) or the full one")
    parser.add_argument("--rounds", type=cli_args.positive_int, default=DEFAULT_ROUNDS,
                        help=f"with --ops: passes over the grid; each operator keeps its "
                             f"fastest pass (default: {DEFAULT_ROUNDS})")
    parser.add_argument("-o", "--output",
                        help="file to write (default: NAME.json, with --ops NAME-ops.json)")
    parser.add_argument("--name", help="this machine's name in the profile (default: hostname)")
    parser.add_argument("--provider", default="cpu",
                        help=f"ONNX Runtime execution provider: {', '.join(PROVIDER_ALIASES)} "
                             "or a full name such as CUDAExecutionProvider (default: cpu)")
    parser.add_argument("--threads", type=cli_args.threads,
                        help="intra-op threads (default: physical cores, as ONNX Runtime)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed runs first (default: {DEFAULT_WARMUP})")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"timed runs; times are medians over them (default: {DEFAULT_RUNS};"
                             f" with --ops at most this many per operator, fewer for slow ones)")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                        help="fix a dynamic input shape (repeatable)")
    parser.add_argument("--optimization", default="all",
                        choices=["disable", "basic", "extended", "all"],
                        help="ONNX Runtime graph optimization level (default: all, as deployed)")
    parser.add_argument("--top", type=cli_args.non_negative_int, default=10,
                        help="print the N slowest nodes (default: 10; 0 prints none)")
    parser.add_argument("--force", action="store_true", help="replace an earlier profile file")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    return parser


def _summary(document: dict, path: Path, top: int) -> None:
    from wpk.console import make_console
    from rich.table import Table

    console = make_console()
    device, total = document["device"], document["total_ms"]
    nodes = document["nodes"]
    if top > 0:
        table = Table(title=f"slowest nodes of {document['model']['name']} on {device['name']}")
        table.add_column("node")
        table.add_column("op")
        table.add_column("ms", justify="right")
        table.add_column("share", justify="right")
        whole = sum(n["ms"] for n in nodes) or 1.0
        for node in sorted(nodes, key=lambda n: -n["ms"])[:top]:
            table.add_row(node["name"], node.get("op_type", ""), f"{node['ms']:.3f}",
                          f"{100 * node['ms'] / whole:.1f} %")
        console.print(table)
    console.print(f"{len(nodes)} nodes, whole model {total['median']:.3f} ms median, "
                  f"{total['p90']:.3f} ms p90 over {document['runs']} runs "
                  f"({device['provider']}, threads: {device['threads']}) -> {path}")


def _output(args: argparse.Namespace, name: str) -> Path:
    """The file to write, checked before the measurement, whose minutes it would otherwise
    waste."""
    what = "latency table" if args.ops else "profile"
    output = Path(args.output or (f"{name}-ops.json" if args.ops else f"{name}.json"))
    if output.is_dir():
        raise WpkError(f"{output}: is a directory, expected a file name for the {what}")
    check_outputs([output], [args.model], force=args.force)
    return output


def _ops(args: argparse.Namespace, name: str, output: Path) -> int:
    """`--ops`: time the operator grid and write the latency table."""
    from wpk.op_bench import time_operators
    from wpk.op_table import save_table

    if args.model or args.input_shape:
        raise WpkError("--ops times a grid of operators, not a model: leave out the model "
                       "and --input-shape")
    document = time_operators(args.grid, provider=args.provider, threads=args.threads,
                              runs=args.runs, warmup=args.warmup, name=name,
                              progress=not args.quiet and sys.stderr.isatty(),
                              optimization=args.optimization, rounds=args.rounds)
    save_table(document, output)
    if not args.quiet:
        from wpk.op_summary import print_table_summary

        print_table_summary(document, output)
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.name or platform.node() or "unnamed"
    if not args.ops and not args.model:
        raise WpkError("name the model to profile, or pass --ops to time the operator grid")
    output = _output(args, name)
    if args.ops:
        return _ops(args, name, output)
    with flags_for():   # its argument checks name the flags that set them
        document = profile_model(
            args.model, provider=args.provider, threads=args.threads, warmup=args.warmup,
            runs=args.runs, input_shapes=parse_input_shapes(args.input_shape), name=name,
            progress=not args.quiet and sys.stderr.isatty(), optimization=args.optimization)
    save_profile(document, output)
    if not args.quiet:
        _summary(document, output, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
