"""Random model inputs of the right shapes and types, for checks and measurements."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def random_feeds(specs: Mapping[str, tuple[Sequence[int], np.dtype]], seed: int,
                 integer_values: int = 1) -> dict[str, np.ndarray]:
    """One array per `name: (shape, dtype)`: normal floats; integers and booleans drawn from
    `range(integer_values)` (the default, all zeros, is a valid index into any axis)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in specs.items():
        dtype = np.dtype(dtype)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(tuple(shape)).astype(dtype)
        else:
            feeds[name] = rng.integers(0, integer_values, tuple(shape)).astype(dtype)
    return feeds
