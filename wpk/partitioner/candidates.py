"""The best model for these tiers: choose among candidate models jointly with cuts and machines.

`wpk-partition --candidate a.onnx:acc=80.3 --candidate b.onnx:acc=75.2 --max-latency-ms 40`
plans every candidate (each one's exact optimum over cuts and machines: `api.execute`, the
minimum s-t cut for every choice of machines) and picks

- objective `accuracy` (the default with candidates): the most accurate candidate whose
  fastest plan meets `--max-latency-ms` (ties: the faster);
- objective `latency`: the fastest candidate at or above `--min-acc` (ties: the more
  accurate).

A candidate meets the latency goal exactly when its fastest plan does, so the choice over
candidates x cuts x machines is exact. Candidates are different models: their node times
come from latency tables or the roofline, which price any model; profiles and pins name one
model's nodes and are refused here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from wpk.errors import WpkError
from wpk.graph import Graph
from wpk.partitioner.api import PartitionResult, execute
from wpk.partitioner.request import PartitionRequest

CANDIDATE_OBJECTIVES = ("accuracy", "latency")


@dataclass(frozen=True)
class Candidate:
    """A model file and its accuracy (any unit, higher is better: top-1 %, mAP, ...)."""

    path: Path
    accuracy: float

    @property
    def label(self) -> str:
        return self.path.name


def parse_candidate(spec: str) -> Candidate:
    """'models/b.onnx:acc=75.2' -> Candidate(Path('models/b.onnx'), 75.2)."""
    path, sep, value = spec.rpartition(":acc=")
    if not sep or not path:
        raise WpkError(f"bad --candidate {spec!r}: expected MODEL.onnx:acc=NUMBER "
                       f"(e.g. mobilenet.onnx:acc=75.2)")
    try:
        accuracy = float(value)
    except ValueError:
        raise WpkError(f"bad --candidate {spec!r}: accuracy {value!r} is not a number") \
            from None
    if not math.isfinite(accuracy):
        raise WpkError(f"bad --candidate {spec!r}: accuracy must be a finite number")
    return Candidate(Path(path), accuracy)


@dataclass
class Planned:
    """One candidate's fastest plan (decided, not written)."""

    candidate: Candidate
    result: PartitionResult
    meets: bool = True
    note: str = ""

    @property
    def latency_ms(self) -> float:
        return self.result.best.evaluation.latency_ms

    @property
    def bytes_beyond_edge(self) -> int:
        return int(self.result.best.evaluation.bytes_beyond_edge)


@dataclass
class Choice:
    planned: list[Planned]       # in the order given
    chosen: Planned
    objective: str


def plan_candidates(candidates: Sequence[Candidate], graphs: Sequence[Graph],
                    request_for: Callable[[Graph], PartitionRequest]) -> list[Planned]:
    """Each candidate's fastest plan over its cuts and machines (exact)."""
    labels = [c.label for c in candidates]
    if len(set(labels)) != len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise WpkError(f"--candidate {twice} is given twice (candidates are told apart by "
                       f"their file names)")
    return [Planned(candidate, execute(request_for(graph)))
            for candidate, graph in zip(candidates, graphs)]


def check_objective(objective: str) -> None:
    if objective not in CANDIDATE_OBJECTIVES:
        raise WpkError(f"--candidate chooses by accuracy or latency (--objective "
                       f"{' or '.join(CANDIDATE_OBJECTIVES)}), not {objective}")


def choose(planned: list[Planned], objective: str, max_latency_ms: float | None,
           min_accuracy: float | None) -> Choice:
    """Mark which candidates meet the goal and pick one; an impossible goal is a one-line
    error naming the best value any candidate reaches."""
    check_objective(objective)
    for item in planned:
        if min_accuracy is not None and item.candidate.accuracy < min_accuracy:
            item.meets, item.note = False, f"below --min-acc {min_accuracy:g}"
        elif max_latency_ms is not None and item.latency_ms > max_latency_ms:
            item.meets, item.note = False, f"over --max-latency-ms {max_latency_ms:g}"
    eligible = [item for item in planned if item.meets]
    if not eligible:
        raise WpkError(_impossible(planned, max_latency_ms, min_accuracy))
    if objective == "accuracy":
        chosen = min(eligible, key=lambda p: (-p.candidate.accuracy, p.latency_ms))
    else:
        chosen = min(eligible, key=lambda p: (p.latency_ms, -p.candidate.accuracy))
    return Choice(planned, chosen, objective)


def _impossible(planned: list[Planned], max_latency_ms: float | None,
                min_accuracy: float | None) -> str:
    """Why no candidate qualifies, with the best value reached."""
    accurate = [p for p in planned if min_accuracy is None or p.candidate.accuracy >= min_accuracy]
    if not accurate:
        best = max(planned, key=lambda p: p.candidate.accuracy)
        return (f"no candidate reaches --min-acc {min_accuracy:g}: the most accurate is "
                f"{best.candidate.label} at {best.candidate.accuracy:g}")
    fastest = min(accurate, key=lambda p: p.latency_ms)
    which = "" if min_accuracy is None else f" with accuracy >= {min_accuracy:g}"
    return (f"no candidate{which} meets --max-latency-ms {max_latency_ms:g}: the fastest is "
            f"{fastest.candidate.label} at {fastest.latency_ms:.2f} ms")
