"""`wpk-partition --candidate A:acc=N ...`: plan every candidate model, print the trade-off,
and write the chosen one's plan (the choice itself: `candidates.py`)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import onnx
from rich.table import Table

from wpk.console import make_console
from wpk.errors import WpkError
from wpk.files import check_outputs, existing_file
from wpk.graph import Graph, parse_input_shapes
from wpk.partitioner.api import PartitionResult, execute
from wpk.partitioner.candidates import Candidate, Choice, check_objective, choose, \
    parse_candidate, plan_candidates
from wpk.partitioner.cli import _bytes, _pairs, request_from_args
from wpk.partitioner.costs import Efficiency, calibrate
from wpk.partitioner.request import PartitionRequest


def _refuse_per_model_flags(args: argparse.Namespace) -> None:
    """Profiles and pins name one model's nodes: they cannot price other models."""
    for flag, given in (("--profile", args.profile), ("--profile-local", args.profile_local),
                        ("--pin", args.pin)):
        if given:
            raise WpkError(f"{flag} names one model's nodes and cannot price the candidates: "
                           f"use --latency-table TIER=FILE (or the roofline estimate)")


def _graphs(candidates: list[Candidate], shape_specs: list[str]) -> list[Graph]:
    """Each candidate loaded, with the --input-shape entries that name its inputs."""
    shapes = parse_input_shapes(shape_specs)
    used: set[str] = set()
    graphs = []
    for candidate in candidates:
        path = existing_file(candidate.path, "model")
        try:
            proto = onnx.load(str(path), load_external_data=False)
            weights = {i.name for i in proto.graph.initializer}
            inputs = {v.name for v in proto.graph.input} - weights
        except Exception:
            inputs = set()       # Graph.load says what is wrong with the file
        own = {name: dims for name, dims in shapes.items() if name in inputs}
        used.update(own)
        graphs.append(Graph.load(path, own or None))
    unused = sorted(set(shapes) - used)
    if unused:
        raise WpkError(f"--input-shape names {unused[0]!r}, which is an input of no candidate")
    return graphs


def choose_candidate(args: argparse.Namespace) -> tuple[PartitionRequest, PartitionResult]:
    """Plan every candidate, print the trade-off, and plan (and write) the chosen one."""
    _refuse_per_model_flags(args)
    candidates = [parse_candidate(spec) for spec in args.candidate]
    objective = args.objective or "accuracy"
    check_objective(objective)
    if args.output:   # checked before the search, so that its work is not lost at the end
        check_outputs([Path(args.output) / "plan.json"], [c.path for c in candidates],
                      force=args.force)
    graphs = _graphs(candidates, args.input_shape)
    efficiency = calibrate() if not args.no_calibrate else Efficiency()
    requests = {id(g): dataclasses.replace(
        request_from_args(args, g, str(c.path)), objective="latency", max_latency_ms=None,
        out_dir=None, verify=False, top=0, with_front=False, efficiency=efficiency)
        for c, g in zip(candidates, graphs)}
    planned = plan_candidates(candidates, graphs, lambda g: requests[id(g)])
    console = make_console(stderr=args.json)
    try:
        choice = choose(planned, objective, args.max_latency_ms, args.min_acc)
    except WpkError:
        console.print(tradeoff_table(planned, None, objective))
        raise
    console.print(tradeoff_table(planned, choice, objective))
    chosen = choice.chosen.result.graph
    request = dataclasses.replace(
        requests[id(chosen)], max_latency_ms=args.max_latency_ms,
        out_dir=Path(args.output) if args.output else Path(f"{chosen.path.stem}_plan"),
        verify=not args.no_verify, top=args.top, with_front=args.pareto,
        other_inputs=[*[path for _, path in _pairs(args.latency_table, "--latency-table")],
                      *[c.path for c in candidates]])
    return request, execute(request)


def tradeoff_table(planned, choice: Choice | None, objective: str) -> Table:
    """Each candidate's fastest plan: latency, bytes beyond the edge, accuracy, the goal."""
    goal = "most accurate within the latency bound" if objective == "accuracy" \
        else "fastest at or above the accuracy floor"
    table = Table(title=f"candidates ({goal})", title_justify="left")
    for column in ("candidate", "accuracy", "latency ms", "bytes beyond edge", "machines",
                   "cut (nodes per tier)", "goal", ""):
        table.add_column(column, justify="right" if column in (
            "accuracy", "latency ms", "bytes beyond edge") else "left")
    for item in planned:
        best = item.result.best
        tiers = item.result.tiers.tiers
        counts = [int((best.evaluation.tiers == i).sum()) for i in range(len(tiers))]
        machines = ", ".join(f"{m.tier}={m.machine}" for m in best.machines if m.machine) or "-"
        table.add_row(item.candidate.label, f"{item.candidate.accuracy:g}",
                      f"{item.latency_ms:.3f}", _bytes(item.bytes_beyond_edge), machines,
                      " / ".join(f"{t.name} {c}" for t, c in zip(tiers, counts)),
                      "meets" if item.meets else item.note,
                      "chosen" if choice is not None and item is choice.chosen else "")
    return table
