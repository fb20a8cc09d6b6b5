"""Runner: time a callable on this machine, and name this machine's hardware."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from wpk.hostinfo import machine_facts


def time_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3,
            max_seconds: float = 2.0) -> float:
    """Median wall time of `fn()` in milliseconds (robust to noise from other processes)."""
    for _ in range(warmup):
        fn()
    samples = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(samples) >= 3:
            break
    return float(np.median(samples) * 1e3)


# a pause before each timed block when sessions take turns: ONNX Runtime's intra-op threads
# spin for some tens of milliseconds after a run, and the session timed next shares the cores
# with them. Two identical MobileNetV2 sessions on 2 cores, 10 rounds (2026-12-06): per-round
# ratios from 0.43 to 2.08 without a pause (whoever went second lost), 0.98-1.03 with 20-50
# ms. Per-operator timing uses the shorter pause, decisions the longer.
SETTLE_S = 0.03
DECIDE_SETTLE_S = 0.05


def _interleaved(fns: dict[str, Callable[[], object]], rounds: int, repeats: int,
                 warmup: int, settle_s: float) -> dict[str, list[list[float]]]:
    """Seconds of each run, per candidate and round: candidates take turns block by block
    (who goes first rotates), so that background load hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[list[float]]] = {name: [] for name in fns}
    names = list(fns)
    for index in range(rounds):
        # rotate who goes first: whoever follows another session pays for its idle threads
        for name in names[index % len(names):] + names[:index % len(names)]:
            fn = fns[name]
            if settle_s:
                time.sleep(settle_s)
            fn()  # one unmeasured run lets other sessions' spinning threads go idle first
            block = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                block.append(time.perf_counter() - start)
            samples[name].append(block)
    return samples


def compare_ms(fns: dict[str, Callable[[], object]], rounds: int = 5, repeats: int = 10,
               warmup: int = 3, percentile: float = 20.0,
               settle_s: float = SETTLE_S) -> dict[str, float]:
    """Interleave candidates block by block so that background load hits them alike, and
    return a low percentile of each one's samples: on a shared machine the distribution is
    bimodal (the second core free or busy), and the low percentile compares the candidates
    in the same (free) mode instead of by how often a neighbour got in the way.

    `settle_s`: pause before each block (see SETTLE_S): ONNX Runtime's intra-op threads keep
    spinning for 10-50 ms after its last run (measured on 2 cores), which halved the speed
    of whatever ran in the block that followed (another session, OpenVINO)."""
    samples = _interleaved(fns, rounds, repeats, warmup, settle_s)
    return {name: float(np.percentile([t for block in blocks for t in block], percentile) * 1e3)
            for name, blocks in samples.items()}


@dataclass
class Ratio:
    """How much faster a candidate is than a baseline, from interleaved rounds: each round
    times both back to back (a block of runs each, the median of a block is the round's
    time), the per-round ratios baseline / candidate are the evidence, their median the
    estimate, and a bootstrap of that median its 95 % interval. Per-round ratios cancel
    what a neighbour's load does to both within a round; a pooled percentile would not."""

    speedups: list[float]               # baseline / candidate, one per round
    baseline_ms: float                  # medians over the rounds
    candidate_ms: float

    @property
    def speedup(self) -> float:
        return float(np.median(self.speedups))

    @property
    def interval(self) -> tuple[float, float]:
        values = np.asarray(self.speedups)
        if values.size < 3:
            return float(values.min()), float(values.max())
        draws = np.random.default_rng(0).choice(values, (2000, values.size))
        medians = np.median(draws, axis=1)
        return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))

    def merged(self, other: "Ratio") -> "Ratio":
        n, m = len(self.speedups), len(other.speedups)
        return Ratio(self.speedups + other.speedups,
                     (self.baseline_ms * n + other.baseline_ms * m) / (n + m),
                     (self.candidate_ms * n + other.candidate_ms * m) / (n + m))

    def faster_by(self, factor: float) -> bool:
        """Faster by at least `factor` (e.g. 1.05) in the estimate, and faster at all
        throughout the 95 % interval."""
        return self.speedup >= factor and self.interval[0] > 1.0

    def describe(self) -> str:
        low, high = self.interval
        return f"{self.speedup:.2f}x (95 % interval {low:.2f}-{high:.2f}x, " \
               f"{len(self.speedups)} rounds)"

    def to_json(self) -> dict:
        low, high = self.interval
        return {"speedup": self.speedup, "speedup_low": low, "speedup_high": high,
                "rounds": len(self.speedups), "ms": self.candidate_ms,
                "default_ms": self.baseline_ms}


def compare_ratio(baseline: Callable[[], object], candidate: Callable[[], object],
                  rounds: int = 8, repeats: int = 10, warmup: int = 3,
                  settle_s: float = DECIDE_SETTLE_S) -> Ratio:
    """`candidate` against `baseline` in interleaved rounds (see `Ratio`)."""
    samples = _interleaved({"baseline": baseline, "candidate": candidate}, rounds, repeats,
                           warmup, settle_s)
    base = [float(np.median(block)) for block in samples["baseline"]]
    cand = [float(np.median(block)) for block in samples["candidate"]]
    return Ratio([b / c for b, c in zip(base, cand)], float(np.median(base)) * 1e3,
                 float(np.median(cand)) * 1e3)


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS does not say)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def hardware_id() -> str:
    """The tuning logs' fingerprint of this machine (see `wpk.hostinfo.MachineFacts`)."""
    return machine_facts().hardware_id()
