"""The tuning log: one JSON object per line, appended as measurements happen.

Each record holds the operator (or slice) signature, the hardware fingerprint, the
configuration and the measured time. A second run with the same log finds earlier measurements
and skips them, so tuning work is reused across runs and across slices that share an operator.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from wpk.optimizer.space import Config, config_key


class TuningLog:
    """Measurements keyed by (task signature, hardware, configuration)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._times: dict[tuple[str, str, str], float] = {}
        self.records: list[dict[str, Any]] = []
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    self._index(record)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run: skip it

    def _index(self, record: dict[str, Any]) -> None:
        key = (record["task"], record["hardware"], config_key(record["config"]))
        self._times[key] = float(record["ms"])
        self.records.append(record)

    def lookup(self, task: str, hardware: str, config: Config) -> float | None:
        return self._times.get((task, hardware, config_key(config)))

    def add(self, task: str, hardware: str, config: Config, ms: float,
            **extra: Any) -> None:
        record = {"task": task, "hardware": hardware, "config": config, "ms": ms,
                  "time": time.time(), **extra}
        self._index(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")

    def best(self, task: str, hardware: str) -> tuple[Config, float] | None:
        found = [(r["config"], float(r["ms"])) for r in self.records
                 if r["task"] == task and r["hardware"] == hardware]
        return min(found, key=lambda item: item[1]) if found else None

    def __len__(self) -> int:
        return len(self._times)
