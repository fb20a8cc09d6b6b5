"""Configuration spaces: a few named knobs, each with a finite list of choices.

A configuration is a plain dict {knob name: value}; strategies see it as a vector of choice
indices (`to_indices` / `from_indices`), so one strategy works over any space: session options,
kernel schedules, or per-operator implementation choices.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

Config = dict[str, Any]


@dataclass(frozen=True)
class Knob:
    name: str
    choices: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"knob {self.name!r} has no choices")


class Space:
    """A product of knobs, optionally restricted by a validity predicate."""

    def __init__(self, knobs: Sequence[Knob], valid: Callable[[Config], bool] | None = None):
        self.knobs = list(knobs)
        self._valid = valid

    @property
    def names(self) -> list[str]:
        return [k.name for k in self.knobs]

    @property
    def cardinalities(self) -> list[int]:
        return [len(k.choices) for k in self.knobs]

    @property
    def size(self) -> int:
        """Size of the full product (before the validity filter)."""
        return math.prod(self.cardinalities)

    def valid(self, config: Config) -> bool:
        return self._valid is None or bool(self._valid(config))

    def from_indices(self, indices: Sequence[int]) -> Config:
        return {k.name: k.choices[int(i) % len(k.choices)] for k, i in zip(self.knobs, indices)}

    def to_indices(self, config: Config) -> list[int]:
        return [k.choices.index(config[k.name]) for k in self.knobs]

    def sample(self, rng: np.random.Generator, tries: int = 1000) -> Config:
        for _ in range(tries):
            config = self.from_indices([rng.integers(n) for n in self.cardinalities])
            if self.valid(config):
                return config
        raise ValueError("no valid configuration found by sampling this space")

    def __iter__(self) -> Iterator[Config]:
        for combo in itertools.product(*(range(n) for n in self.cardinalities)):
            config = self.from_indices(combo)
            if self.valid(config):
                yield config

    def default(self) -> Config:
        """The first valid configuration in index order (first choice of every knob if valid)."""
        return next(iter(self))


def config_key(config: Config) -> str:
    """A canonical string for a configuration (dictionary order does not matter)."""
    return json.dumps(config, sort_keys=True, default=str)
