"""Real input samples for int8 calibration and for the accuracy guard (`--calibration-data`).

The file is an `.npz` with one array per model input, or a directory of `NAME.npy` files; the
first axis of every array counts samples. Each sample is either one whole input (array shape
`(N, *input_shape)`) or, for an input whose first (batch) dimension is 1 or symbolic, one row
(array shape `(N, *input_shape[1:])`, each sample fed with batch 1). Arrays that name no
input (labels, say) are ignored. With enough samples, a held-out part is kept for the guard
so that the accuracy figure is not measured on the data int8 was calibrated on.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from wpk.errors import WpkError

InputSpec = tuple[str, Sequence[Any], np.dtype]   # name, shape (ints, None or names), dtype

# at least this many samples before a part is held out for the guard
HOLD_OUT_FROM = 8
# the guard runs every candidate on every guard sample: bound its cost
GUARD_MAX = 32


@dataclass
class Calibration:
    source: str
    calibration: list[dict[str, np.ndarray]]
    guard: list[dict[str, np.ndarray]]
    held_out: bool                      # guard samples are not among the calibration samples

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "calibration_samples": len(self.calibration),
                "guard_samples": len(self.guard), "held_out": self.held_out}


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays by name from an .npz file or a directory of .npy files (one-line errors)."""
    path = Path(path)
    if not path.exists():
        raise WpkError(f"{path}: no such file or directory (calibration data)")
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise WpkError(f"{path}: no .npy files in this directory (calibration data)")
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise WpkError(f"{path}: one array, not an .npz of arrays named after the "
                               f"model's inputs (calibration data)")
            return {name: data[name] for name in data.files}
    except WpkError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise WpkError(f"{path}: not an .npz file or a directory of .npy files "
                       f"({str(error).splitlines()[0][:120]})") from None


def _matches(actual: Sequence[int], expected: Sequence[Any]) -> bool:
    return len(actual) == len(expected) and all(
        not isinstance(e, int) or e <= 0 or a == e for a, e in zip(actual, expected))


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def to_samples(arrays: Mapping[str, np.ndarray], inputs: Sequence[InputSpec],
               source: str) -> list[dict[str, np.ndarray]]:
    """Cut each input's array along its first axis into feeds, checking names, shapes, dtypes."""
    if not inputs:
        raise WpkError(f"{source}: the model has no inputs to calibrate")
    per_input: dict[str, list[np.ndarray]] = {}
    for name, shape, dtype in inputs:
        if name not in arrays:
            have = ", ".join(sorted(arrays)) or "none"
            raise WpkError(f"{source}: no array for input {name!r} (arrays: {have})")
        array = np.asarray(arrays[name])
        dtype = np.dtype(dtype)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or \
                not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise WpkError(f"{source}: array {name!r} is {array.dtype}, input {name!r} is "
                           f"{dtype}")
        shape = list(shape)
        batch_free = bool(shape) and (not isinstance(shape[0], int) or shape[0] in (0, 1))
        if array.ndim == len(shape) + 1 and _matches(array.shape[1:], shape):
            samples = [array[i] for i in range(array.shape[0])]
        elif batch_free and array.ndim == len(shape) and _matches(array.shape[1:], shape[1:]):
            samples = [array[i:i + 1] for i in range(array.shape[0])]
        else:
            raise WpkError(f"{source}: array {name!r} has shape {list(array.shape)}, input "
                           f"{name!r} is {_shape_text(shape)} (first axis = samples)")
        per_input[name] = [np.ascontiguousarray(s, dtype=dtype) for s in samples]
    counts = {name: len(s) for name, s in per_input.items()}
    if len(set(counts.values())) > 1:
        raise WpkError(f"{source}: inputs have different sample counts "
                       + ", ".join(f"{n}={c}" for n, c in counts.items()))
    count = next(iter(counts.values()))
    if count == 0:
        raise WpkError(f"{source}: no samples (the arrays' first axis is 0)")
    return [{name: per_input[name][i] for name in per_input} for i in range(count)]


def split(samples: list[dict[str, np.ndarray]], source: str) -> Calibration:
    """Hold out the last quarter (at most GUARD_MAX) for the guard when there are enough."""
    if len(samples) >= HOLD_OUT_FROM:
        guard = min(GUARD_MAX, max(2, len(samples) // 4))
        return Calibration(source, samples[:-guard], samples[-guard:], held_out=True)
    return Calibration(source, samples, samples[:GUARD_MAX], held_out=False)


def load(data: Any, inputs: Sequence[InputSpec]) -> Calibration:
    """Calibration data for a model with `inputs`: a path (.npz or .npy directory), arrays by
    input name (first axis = samples), a list of ready feeds (one dict per sample), or a
    `Calibration` already split."""
    if isinstance(data, Calibration):
        return data
    if isinstance(data, (str, Path)):
        source = str(data)
        samples = to_samples(read_arrays(data), inputs, source)
    elif isinstance(data, Mapping):
        source = "calibration arrays"
        samples = to_samples(data, inputs, source)
    else:
        source = "calibration feeds"
        samples = [dict(feed) for feed in data]
        if not samples:
            raise WpkError(f"{source}: no samples")
        for name, _shape, dtype in inputs:
            if any(name not in feed for feed in samples):
                raise WpkError(f"{source}: no value for input {name!r}")
            for feed in samples:
                feed[name] = np.ascontiguousarray(feed[name], dtype=np.dtype(dtype))
    return split(samples, source)


def for_plan(plan: Any, base: Path, path: str | Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per-tier samples for a plan: the file holds the whole model's inputs; each slice's
    inputs are computed by running the earlier tiers' slices (ONNX Runtime) on them."""
    import onnxruntime as ort

    from wpk.plan import slice_path

    arrays = read_arrays(path)
    env_samples: list[dict[str, np.ndarray]] | None = None
    out: dict[str, list[dict[str, np.ndarray]]] = {}
    for tier in plan.tiers:
        if not tier.slice:
            continue
        session = ort.InferenceSession(str(slice_path(base, tier)),
                                       providers=["CPUExecutionProvider"])
        specs = [(i.name, i.shape, _np_dtype(i.type)) for i in session.get_inputs()]
        if not specs:
            continue
        if env_samples is None:
            env_samples = to_samples(arrays, specs, str(path))
        else:
            missing = [s for s in specs if s[0] not in env_samples[0]]
            if missing:
                first = to_samples(arrays, missing, str(path))
                if len(first) != len(env_samples):
                    raise WpkError(f"{path}: inputs have different sample counts")
                for env, extra in zip(env_samples, first):
                    env.update(extra)
        feeds = [{name: env[name] for name, _, _ in specs} for env in env_samples]
        out[tier.name] = feeds
        names = [o.name for o in session.get_outputs()]
        for env, feed in zip(env_samples, feeds):
            env.update(zip(names, session.run(names, feed)))
    return out


def model_inputs(path: str | Path) -> list[InputSpec]:
    """A model file's inputs as (name, shape, dtype), as ONNX Runtime sees them."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [(i.name, i.shape, _np_dtype(i.type)) for i in session.get_inputs()]


def _np_dtype(type_text: str) -> np.dtype:
    inner = type_text[len("tensor("):-1]
    return np.dtype("float32" if inner == "float" else "float64" if inner == "double"
                    else inner)
