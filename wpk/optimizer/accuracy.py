"""Accuracy guard: compare a candidate with the original model on sample inputs, per output."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from wpk.feeds import is_mask, padded_mask
from wpk.tensor_spec import TensorSpec

Runner = Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]

# fp32 rewrites may only move results by float rounding: this is their budget
FP32_RELATIVE = 1e-4


@dataclass
class OutputError:
    name: str
    max_abs: float
    relative: float          # ||candidate - reference|| / ||reference|| over all samples
    top1_agreement: float | None  # for (batch, classes) outputs

    def to_json(self) -> dict:
        return asdict(self)


def sample_inputs(inputs: Sequence[TensorSpec], count: int,
                  seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random feeds, free dimensions as 1: floats uniform in [0, 1) (image-like), other
    integers small and non-negative; masks (`wpk.feeds.is_mask`) whole in the first feed
    (the one candidates are timed on) and padded in the others (`padded_mask`), so that
    the accuracy guard sees masked keys too."""
    rng = np.random.default_rng(seed)
    feeds = []
    for sample in range(count):
        feed = {}
        for spec in inputs:
            shape, dtype = [d if d > 0 else 1 for d in spec.shape], spec.numpy_dtype
            if np.issubdtype(dtype, np.floating):
                feed[spec.name] = rng.random(shape).astype(dtype)
            elif is_mask(spec.name, dtype):
                feed[spec.name] = padded_mask(shape, dtype, sample)
            else:
                feed[spec.name] = rng.integers(0, 8, shape).astype(dtype)
        feeds.append(feed)
    return feeds


def compare(reference: Runner, candidate: Runner, feeds: Sequence[Mapping[str, np.ndarray]],
            names: Sequence[str]) -> list[OutputError]:
    refs = [reference(f) for f in feeds]
    cands = [candidate(f) for f in feeds]
    errors = []
    for i, name in enumerate(names):
        r = np.concatenate([np.asarray(out[i], np.float64).ravel() for out in refs])
        c = np.concatenate([np.asarray(out[i], np.float64).ravel() for out in cands])
        if r.shape != c.shape:
            errors.append(OutputError(name, float("inf"), float("inf"), None))
            continue
        diff = np.abs(r - c)
        relative = float(np.linalg.norm(r - c) / max(np.linalg.norm(r), 1e-12))
        top1 = None
        shape = np.asarray(refs[0][i]).shape
        if len(shape) == 2 and shape[1] > 1:
            agree = [np.mean(np.argmax(a[i], 1) == np.argmax(b[i], 1)) for a, b in zip(refs, cands)]
            top1 = float(np.mean(agree))
        errors.append(OutputError(name, float(diff.max()) if diff.size else 0.0, relative, top1))
    return errors


def within(errors: Sequence[OutputError], relative_budget: float) -> bool:
    return all(np.isfinite(e.relative) and e.relative <= relative_budget for e in errors)
