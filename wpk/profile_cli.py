"""`wpk-profile`: measure every node of a model on this machine and write a profile file.

Run it on each machine you partition for (a Raspberry Pi, a Jetson, an edge server, a cloud
VM), copy the files back, and plan with `wpk-partition --profile TIER=FILE`. Needs only the
core dependencies (onnx, onnxruntime, numpy, jsonschema, rich).
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
from wpk.profiling import (DEFAULT_RUNS, DEFAULT_WARMUP, PROVIDER_ALIASES, profile_model,
                           save_profile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wpk-profile", description=__doc__.splitlines()[0],
        epilog="example: wpk-profile model.onnx -o pi4.json --name pi4 --threads 4")
    parser.add_argument("model", help="the ONNX model (the same file you will partition)")
    parser.add_argument("-o", "--output", help="profile file to write (default: NAME.json)")
    parser.add_argument("--name", help="this machine's name in the profile (default: hostname)")
    parser.add_argument("--provider", default="cpu",
                        help=f"ONNX Runtime execution provider: {', '.join(PROVIDER_ALIASES)} "
                             "or a full name such as CUDAExecutionProvider (default: cpu)")
    parser.add_argument("--threads", type=cli_args.threads,
                        help="intra-op threads (default: physical cores, as ONNX Runtime)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed runs first (default: {DEFAULT_WARMUP})")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"timed runs; times are medians over them (default: {DEFAULT_RUNS})")
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


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the output is checked before the measurement, whose minutes it would otherwise waste
    name = args.name or platform.node() or "unnamed"
    output = Path(args.output or f"{name}.json")
    if output.is_dir():
        raise WpkError(f"{output}: is a directory, expected a file name for the profile")
    check_outputs([output], [args.model], force=args.force)
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
