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
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np

from wpk.errors import WpkError
from wpk.tensor_spec import TensorSpec

# what --calibration-data (wpk-optimize, wpk-prune) takes, as its help says it
DATA_FILES_HELP = ".npz with one array per model input (first axis = samples) or a directory of " \
    "INPUT.npy files"

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
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise WpkError(f"{path}: no .npy files in this directory (calibration data)")
        return {f.stem: _read(f, lambda f=f: np.load(f, allow_pickle=False)) for f in files}
    data = _read(path, lambda: np.load(path, allow_pickle=False))
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise WpkError(f"{path}: one array, not an .npz of arrays named after the model's "
                       f"inputs (calibration data)")
    with data:
        return {name: _read(path, lambda name=name: data[name], name) for name in data.files}


def _read(path: Path, read: Callable[[], Any], member: str | None = None) -> Any:
    """`read()`, with numpy's ways to fail on a bad file as a one-line WpkError."""
    try:
        return read()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        # numpy's first sentence says it: "Object arrays cannot be loaded when ...",
        # "This file contains pickled (object) data", "Cannot load file containing ..."
        reason = str(error).splitlines()[0].split(". ")[0][:120] if str(error) else \
            type(error).__name__
        if member:
            raise WpkError(f"{path}: array {member!r} is not readable as numbers "
                           f"({reason})") from None
        kind = "a readable .npy array" if path.suffix == ".npy" else \
            "an .npz file or a directory of .npy files"
        raise WpkError(f"{path}: not {kind} ({reason})") from None


def _matches(actual: Sequence[int], expected: Sequence[int]) -> bool:
    return len(actual) == len(expected) and all(
        e < 1 or a == e for a, e in zip(actual, expected))


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) if d >= 1 else "?" for d in shape) + "]"


def _check_dtype(array: np.ndarray, dtype: Any, name: str, source: str) -> None:
    """Numbers cast within their kind (float64 -> float32, int64 -> uint8 when the values fit:
    `_converted` checks), never across (float -> int64)."""
    dtype = np.dtype(dtype)
    integers = np.issubdtype(array.dtype, np.integer) and np.issubdtype(dtype, np.integer)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or \
            not (integers or np.can_cast(array.dtype, dtype, casting="same_kind")):
        raise WpkError(f"{source}: array {name!r} is {array.dtype}, input {name!r} is {dtype}")


def _converted(array: np.ndarray, dtype: Any, name: str, source: str) -> np.ndarray:
    """`array` as `dtype`, contiguous; refused when the cast would change what it says:
    integers that do not fit (int64 ids into int32 wrap around), or NaN/infinity (after the
    cast: float64 beyond float32's range becomes inf), which poisons int8 calibration ranges
    and makes every candidate's accuracy NaN, so that the guard rejects them all."""
    dtype = np.dtype(dtype)
    _check_dtype(array, dtype, name, source)
    if np.issubdtype(dtype, np.integer) and array.size:
        info, low, high = np.iinfo(dtype), array.min(), array.max()
        if low < info.min or high > info.max:
            raise WpkError(f"{source}: array {name!r} holds values in [{low}, {high}], beyond "
                           f"the range of input {name!r} ({dtype})")
    with np.errstate(over="ignore"):      # overflow is reported below, as inf
        values = np.ascontiguousarray(array, dtype=dtype)
    if np.issubdtype(dtype, np.inexact) and not np.isfinite(values).all():
        at = [int(i) for i in np.argwhere(~np.isfinite(values))[0]]
        raise WpkError(f"{source}: array {name!r} holds NaN or infinite values (first at "
                       f"index {at})")
    return values


def to_samples(arrays: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec],
               source: str) -> list[dict[str, np.ndarray]]:
    """Cut each input's array along its first axis into feeds, checking names, shapes, dtypes."""
    if not inputs:
        raise WpkError(f"{source}: the model has no inputs to calibrate")
    per_input: dict[str, list[np.ndarray]] = {}
    for spec in inputs:
        name, shape, dtype = spec.name, spec.shape, spec.numpy_dtype
        if name not in arrays:
            have = ", ".join(sorted(arrays)) or "none"
            raise WpkError(f"{source}: no array for input {name!r} (arrays: {have})")
        array = np.asarray(arrays[name])
        _check_dtype(array, dtype, name, source)
        batch_free = bool(shape) and shape[0] <= 1      # 1 or free
        if array.ndim == len(shape) + 1 and _matches(array.shape[1:], shape):
            rows = False
        elif batch_free and array.ndim == len(shape) and _matches(array.shape[1:], shape[1:]):
            rows = True
        else:
            raise WpkError(f"{source}: array {name!r} has shape {list(array.shape)}, input "
                           f"{name!r} is {_shape_text(shape)} (first axis = samples)")
        values = _converted(array, dtype, name, source)
        per_input[name] = [values[i:i + 1] if rows else values[i]
                           for i in range(values.shape[0])]
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


def load(data: Any, inputs: Sequence[TensorSpec]) -> Calibration:
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
        for spec in inputs:
            name = spec.name
            if any(name not in feed for feed in samples):
                raise WpkError(f"{source}: no value for input {name!r}")
            for i, feed in enumerate(samples):
                feed[name] = _converted(np.asarray(feed[name]), spec.numpy_dtype, name,
                                        f"{source} (sample {i})")
    return split(samples, source)


def for_plan(plan: Any, base: Path, path: str | Path, tiers: Collection[str] | None = None
             ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per-tier samples for a plan: the file holds the whole model's inputs; each slice's
    inputs are computed by running the earlier tiers' slices (ONNX Runtime) on them.
    `tiers`: the tiers wanted (default all); no slice after the last of them is run."""
    from wpk.plan import slice_path

    arrays = read_arrays(path)
    used = [t for t in plan.tiers if t.slice]
    wanted = set(tiers) if tiers is not None else {t.name for t in used}
    env_samples: list[dict[str, np.ndarray]] | None = None
    out: dict[str, list[dict[str, np.ndarray]]] = {}
    for tier in used:
        if not wanted - set(out):
            break
        where = f"tier {tier.name!r}"
        session = _session(slice_path(base, tier), f"the slice of {where}")
        specs = model_specs(session)
        if not specs:
            continue
        # an input that no earlier slice computed comes from the file (the model's inputs)
        fresh = [s for s in specs if env_samples is None or s.name not in env_samples[0]]
        absent = [s.name for s in fresh if s.name not in arrays]
        if absent:
            raise WpkError(f"{path}: {where} takes {absent[0]!r}, which neither this file "
                           f"(arrays: {', '.join(sorted(arrays)) or 'none'}) nor an earlier "
                           f"tier's slice provides")
        if fresh:
            first = to_samples(arrays, fresh, str(path))
            if env_samples is None:
                env_samples = first
            elif len(first) != len(env_samples):
                raise WpkError(f"{path}: {where} takes {fresh[0].name!r}, which has "
                               f"{len(first)} samples; the earlier inputs have "
                               f"{len(env_samples)}")
            else:
                for env, extra in zip(env_samples, first):
                    env.update(extra)
        feeds = [{s.name: env[s.name] for s in specs} for env in env_samples]
        out[tier.name] = feeds
        names = [o.name for o in session.get_outputs()]
        for i, (env, feed) in enumerate(zip(env_samples, feeds)):
            try:
                env.update(zip(names, session.run(names, feed)))
            except Exception as error:  # ORT's own exception types
                raise WpkError(f"{path}: the slice of {where} fails on sample {i} "
                               f"({str(error).splitlines()[0][:160]})") from None
    return out


def model_inputs(path: str | Path) -> list[TensorSpec]:
    """A model file's inputs, as ONNX Runtime sees them."""
    return model_specs(_session(path, "this model"))


def model_specs(session: Any) -> list[TensorSpec]:
    """An ONNX Runtime session's inputs (free dimensions as -1)."""
    return [TensorSpec.from_ort(i.name, i.shape, i.type) for i in session.get_inputs()]


def _session(path: str | Path, what: str) -> Any:
    """A CPU ONNX Runtime session; a file ORT cannot load is a one-line WpkError."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # NoSuchFile, InvalidProtobuf, Fail, ...
        raise WpkError(f"{path}: ONNX Runtime cannot load {what} "
                       f"({str(error).splitlines()[0][:160]})") from None
