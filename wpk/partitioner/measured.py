"""Cost columns from files: measured profiles (`--profile TIER=FILE`, `--profile-local
TIER`) and times predicted from latency tables (`--latency-table TIER=FILE`).

`--profile-local TIER` is a shortcut for "run wpk-profile here, then plan with the file": it
writes the same profile document and reads it back through the same loader. A latency table
(`wpk-profile --ops`) prices any model: its times are predicted by `wpk.op_predict` from
single operators timed on the tier's machine, with no run of the model there.
"""
from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

from wpk.errors import WpkError
from wpk.graph import Graph, parse_input_shapes
from wpk.partitioner.costs import TierCosts, measured_costs


Warn = Callable[[str], None]


def _print_warning(message: str) -> None:
    print(f"wpk: warning: {message}")


def costs_from_profile(graph: Graph, tier: str, path: Path, label: str | None = None,
                       warn: Warn = _print_warning) -> TierCosts:
    """One tier's measured column from a profile file (validated, names checked)."""
    from wpk.profiling import load_profile

    profile = load_profile(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        node_ms = profile.node_times_for(graph)
    for warning in caught:
        warn(str(warning.message))
    name = label or profile.device_name
    return measured_costs(tier, node_ms, f"measured ({name})", machine=name,
                          profile={"name": profile.device_name, "sha256": profile.sha256,
                                   "file": str(path)}, batch=profile.batch_for(graph))


def costs_from_table(graph: Graph, tier: str, path: Path,
                     warn: Warn = _print_warning) -> TierCosts:
    """One tier's column predicted from a latency table (validated; families the table
    lacks are priced by stand-ins, with a warning naming them)."""
    from wpk.op_predict import Predictor
    from wpk.op_table import load_table

    table = load_table(path)
    prediction = Predictor(table).predict(graph)
    if prediction.stand_ins:
        stand_ins = ", ".join(f"{family} as {used}"
                              for family, used in sorted(prediction.stand_ins.items()))
        warn(f"{path}: {graph.name} has operators the table did not time; priced {stand_ins}")
    name = table.device_name
    return measured_costs(tier, prediction.node_ms, f"predicted ({name}, latency table)",
                          machine=name, profile={"name": name, "file": str(path),
                                                 "kind": "latency-table"})


def measured_costs_from_args(graph: Graph, profiles: Sequence[tuple[str, str]],
                             profile_local: str | None, input_shape_specs: Sequence[str] = (),
                             warn: Warn = _print_warning, batch: int = 1,
                             tables: Sequence[tuple[str, str]] = ()
                             ) -> dict[str, list[TierCosts]]:
    """Tier name -> candidate machines' cost columns, from the CLI's profile and latency
    table options (`--profile-local` profiles this machine; with `batch` above 1, at batch 1
    and at `batch` requests per run, one machine that `pair_measured` makes one column of)."""
    measured: dict[str, list[TierCosts]] = {}
    for tier, file in tables:
        measured.setdefault(tier, []).append(costs_from_table(graph, tier, Path(file), warn))
    for tier, file in profiles:
        path = Path(file)
        measured.setdefault(tier, []).append(costs_from_profile(graph, tier, path, warn=warn))
    if profile_local:
        if graph.path is None:
            raise WpkError("--profile-local needs the model as a file")
        given = parse_input_shapes(input_shape_specs)
        for rows in dict.fromkeys((1, batch)):
            shapes = given if rows == 1 else \
                {name: (rows, *graph.tensors[name].shape[1:]) for name in graph.inputs}
            measured.setdefault(profile_local, []).append(
                _local_costs(graph, profile_local, shapes, warn))
    return measured


def _local_costs(graph: Graph, tier: str, shapes: dict, warn: Warn) -> TierCosts:
    """This machine's profile of the model at `shapes`, as a cost column for `tier`."""
    from wpk.profiling import profile_model

    document = profile_model(graph.path, name=f"local-{tier}", input_shapes=shapes or None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "local-profile.json"
        path.write_text(json.dumps(document))
        return costs_from_profile(graph, tier, path, f"local-{tier}", warn)


def warn_to_stderr(message: str) -> None:
    print(f"wpk: warning: {message}", file=sys.stderr)
