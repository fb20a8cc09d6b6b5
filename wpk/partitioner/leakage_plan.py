"""Leakage in planning: the figures a request asks for, the tensors its bound keeps on the
device, the tightest bound that still allows a plan, and the figures the plan records."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from wpk.errors import ParameterError, WpkError, print_warning
from wpk.graph import Graph
from wpk.plan import Plan
from wpk.partitioner import leakage, search
from wpk.partitioner.request import PartitionRequest

_DECIMALS = {"dcor": 3, "ssim": 3, "psnr": 2}


def report_for(graph: Graph, request: PartitionRequest) -> leakage.LeakageReport | None:
    """The request's leakage figures: given, measured on its calibration data, or (for a bound
    without data) on the labelled synthetic fallback; None when leakage plays no part."""
    if request.leakage is not None:
        return request.leakage
    if request.max_leakage is None and request.calibration_data is None:
        return None
    return leakage.calibration_report(graph, request.calibration_data, request.leakage_samples,
                                      print_warning)


def private_for(report: leakage.LeakageReport | None, bound: str | None) -> frozenset[str]:
    """The tensors the bound forbids on the device's link."""
    if report is None or bound is None:
        return frozenset()
    return leakage.private_tensors(report, *leakage.parse_bound(bound))


def check_bound(problem_with: Callable[[frozenset[str]], search.Problem],
                report: leakage.LeakageReport, bound: str) -> None:
    """A bound no plan meets is a one-line error naming the tightest one that allows a plan
    (a search under each candidate bound, bisected: allowing more never hurts)."""
    metric, value = leakage.parse_bound(bound)

    def allows(limit: float) -> bool:
        try:
            search.min_latency(problem_with(leakage.private_tensors(report, metric, limit)))
        except WpkError:
            return False
        return True

    if allows(value):
        return
    levels = sorted({t.value(metric) for t in report.tensors.values()})
    if not levels or not allows(levels[-1]):
        return            # the bound is not what stops it: the search says what does
    low, high = 0, len(levels) - 1      # levels[high] allows a plan
    while low < high:
        middle = (low + high) // 2
        if allows(levels[middle]):
            high = middle
        else:
            low = middle + 1
    digits = _DECIMALS[metric]
    tightest = math.ceil(levels[high] * 10 ** digits) / 10 ** digits
    raise ParameterError(f"impossible constraint: no plan keeps every tensor leaving the device "
                         f"within {{max_leakage}} {bound}; the tightest possible is "
                         f"{metric}={tightest:.{digits}f}", "max_leakage")


def record(plan: Plan, report: leakage.LeakageReport | None, bound: str | None,
           device: str) -> None:
    """Write the bound, the figures' source, and each device link's figures into the plan."""
    if report is None:
        return
    plan.objective = dataclasses.replace(plan.objective, max_leakage=bound,
                                         leakage_data=report.source)
    for link in plan.links:
        if link.src == device:
            link.leakage = {name: _figures(report.tensors[name]) for name in link.tensors
                            if name in report.tensors}


def front_metric(bound: str | None) -> str:
    """The figure a front is drawn in: the bound's, else dCor."""
    return leakage.parse_bound(bound)[0] if bound else "dcor"


def _figures(t: leakage.TensorLeakage) -> dict[str, float]:
    data = t.to_json()
    return {key: data[key] for key in ("dcor", "dcor_low", "dcor_high", "psnr_db", "ssim")}


def front(problem: search.Problem, report: leakage.LeakageReport, metric: str
          ) -> list[tuple[float, float | None, np.ndarray]]:
    """The latency / leakage front, as (latency ms, highest figure leaving the device, tiers):
    the fastest plan, then the fastest that leaks strictly less than it, and so on until
    nothing leaves the device or no plan leaks less (each point an exact min-cut)."""
    points: list[tuple[float, float | None, np.ndarray]] = []
    private = problem.private
    while True:
        try:
            tiers = search.min_latency(dataclasses.replace(problem, private=private))
        except WpkError:
            return points
        evaluation = search.evaluate(problem, tiers)
        crossing = evaluation.forward_tensors[0] if evaluation.forward_tensors else []
        worst = max((report.tensors[t].value(metric) for t in crossing if t in report.tensors),
                    default=None)
        points.append((evaluation.latency_ms, worst, tiers))
        if worst is None:
            return points
        private = private | {n for n, t in report.tensors.items() if t.value(metric) >= worst}
