"""A cost model learned from the tuning log, shared by every search strategy.

Measuring a configuration costs a build and many timed runs; predicting it costs microseconds.
So strategies propose more configurations than the budget allows, the model ranks them, and
only the most promising are measured (TVM's AutoTVM does the same with XGBoost over loop
features). Ours is smaller: ridge regression of log(time) on each knob's choice (one-hot) and
each pair of knobs' joint choice, refitted after every measurement (a few hundred features at
most; a solve takes well under a millisecond).

The tuning log carries it across tasks and models: measurements of other tasks over the same
knobs on the same machine (another convolution's schedules, another slice's session options)
join the fit with a lower weight, each task centred on its own mean, so what they teach is
which choices are fast *relative to the others*, not absolute times.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

import numpy as np

from wpk.optimizer.database import TuningLog
from wpk.optimizer.space import Config, Space

OTHER_TASK_WEIGHT = 0.5   # a measurement of another task counts half as much as one of this task
RIDGE = 1.0               # L2 penalty: with few samples, predictions stay near the task's mean
MIN_SAMPLES = 4           # below this many measurements of this task, the model does not rank


class CostModel:
    """Predicted log-time of configurations of one space, from measurements of this task and
    (weighted lower) of other tasks over the same knobs."""

    def __init__(self, space: Space, pairs: bool = True):
        self.space = space
        self._pairs = list(itertools.combinations(range(len(space.knobs)), 2)) if pairs else []
        self._offsets = np.cumsum([0] + space.cardinalities)
        pair_sizes = [space.cardinalities[a] * space.cardinalities[b] for a, b in self._pairs]
        self._pair_offsets = self._offsets[-1] + np.cumsum([0] + pair_sizes)
        self.width = int(self._pair_offsets[-1])
        self._rows: dict[str, list[tuple[np.ndarray, float]]] = {}
        self._task = ""
        self._weights: np.ndarray | None = None
        self._intercept = 0.0

    # -- data ------------------------------------------------------------------------------
    def features(self, config: Config) -> np.ndarray | None:
        """Indices of the active features of `config` (None: a value outside the space)."""
        try:
            indices = self.space.to_indices(config)
        except (KeyError, ValueError):
            return None
        active = [self._offsets[k] + i for k, i in enumerate(indices)]
        for p, (a, b) in enumerate(self._pairs):
            active.append(self._pair_offsets[p] + indices[a] * self.space.cardinalities[b]
                          + indices[b])
        return np.asarray(active, dtype=np.int64)

    def observe(self, task: str, config: Config, ms: float) -> None:
        """One measurement (failed candidates, infinitely slow, teach nothing here)."""
        active = self.features(config)
        if active is not None and math.isfinite(ms) and ms > 0:
            self._rows.setdefault(task, []).append((active, math.log(ms)))
            self._weights = None

    def observe_log(self, log: TuningLog | None, hardware: str) -> int:
        """Every earlier measurement on this machine over exactly this space's knobs."""
        if log is None:
            return 0
        names = set(self.space.names)
        before = sum(len(rows) for rows in self._rows.values())
        for record in log.records:
            config = record.get("config")
            if record.get("hardware") == hardware and isinstance(config, dict) \
                    and set(config) == names:
                self.observe(str(record["task"]), config, float(record["ms"]))
        return sum(len(rows) for rows in self._rows.values()) - before

    def samples(self, task: str) -> int:
        return len(self._rows.get(task, []))

    # -- fit and predict -------------------------------------------------------------------
    def fit(self, task: str) -> bool:
        """Fit for `task`; False when it has too few measurements to rank anything (a task
        never measured is ranked from other tasks alone, given enough of them)."""
        others = sum(len(rows) for other, rows in self._rows.items() if other != task)
        if self.samples(task) < MIN_SAMPLES and others < 2 * MIN_SAMPLES:
            return False
        if self._weights is not None and self._task == task:
            return True
        rows, targets, weights = [], [], []
        for other, measured in self._rows.items():
            mean = float(np.mean([y for _, y in measured]))
            weight = 1.0 if other == task else OTHER_TASK_WEIGHT
            for active, y in measured:
                rows.append(active)
                targets.append(y - mean)
                weights.append(weight)
        design = np.zeros((len(rows), self.width))
        for r, active in enumerate(rows):
            design[r, active] = 1.0
        w = np.sqrt(np.asarray(weights))[:, None]
        a, y = design * w, np.asarray(targets) * w[:, 0]
        # the dual form: samples are far fewer than features
        gram = a @ a.T + RIDGE * np.eye(len(rows))
        self._weights = a.T @ np.linalg.solve(gram, y)
        own = [y for _, y in self._rows.get(task, [])]
        self._intercept = float(np.mean(own)) if own else 0.0   # ranking needs no intercept
        self._task = task
        return True

    def predict_log_ms(self, configs: Sequence[Config]) -> np.ndarray:
        """Predicted log(ms) per configuration (inf where a value is outside the space)."""
        if self._weights is None:
            raise RuntimeError("fit() the model first")
        out = np.full(len(configs), np.inf)
        for i, config in enumerate(configs):
            active = self.features(config)
            if active is not None:
                out[i] = self._intercept + float(self._weights[active].sum())
        return out

    def rank(self, task: str, configs: Iterable[Config]) -> list[Config]:
        """`configs`, most promising first (unchanged order until the model can fit)."""
        configs = list(configs)
        if not configs or not self.fit(task):
            return configs
        order = np.argsort(self.predict_log_ms(configs), kind="stable")
        return [configs[i] for i in order]
