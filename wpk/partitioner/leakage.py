"""Leakage figures per candidate cut tensor, and the bound that turns them into a constraint.

`measure` runs the model on calibration samples, fetches the tensors that may cross the
device's link in passes (a few at a time as extra graph outputs, so memory stays bounded),
keeps one n x n Gram matrix per tensor, and scores each with `leakage_stats`: distance
correlation with the input (and its band), and a ridge reconstruction attack (PSNR, SSIM).
`private_tensors` names the tensors a bound forbids on the device's link.
"""
from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from wpk.errors import ParameterError, WpkError
from wpk.feeds import random_feeds
from wpk.graph import Graph
from wpk.partitioner import leakage_stats as stats

METRICS = ("dcor", "psnr", "ssim")       # every figure: larger means more leakage
PASS_BYTES = 256 * 2 ** 20               # features held in memory per pass (more spills to disk
GRAM_BLOCK = 8192                        # disk); columns per block of the Gram product


@dataclass(frozen=True)
class TensorLeakage:
    """What an attacker who sees `tensor` learns about the input, on the calibration set."""

    tensor: str
    producer: str | None                 # node name; None for a model input
    shape: tuple[int, ...]
    dcor: float
    dcor_low: float
    dcor_high: float
    psnr_db: float
    ssim: float

    def value(self, metric: str) -> float:
        return {"dcor": self.dcor, "psnr": self.psnr_db, "ssim": self.ssim}[metric]

    def to_json(self) -> dict:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["psnr_db"] = _finite(self.psnr_db)
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in data.items()}


def _finite(value: float) -> float:
    """JSON has no infinity: an exact reconstruction reads as 999 dB."""
    return float(min(value, 999.0))


@dataclass
class LeakageReport:
    model: str
    samples: int
    source: str                          # the calibration file, or "synthetic"
    tensors: dict[str, TensorLeakage] = field(default_factory=dict)

    @property
    def synthetic(self) -> bool:
        return self.source == "synthetic"

    def to_json(self) -> dict:
        return {"model": self.model, "samples": self.samples, "source": self.source,
                "synthetic": self.synthetic,
                "tensors": [t.to_json() for t in self.tensors.values()]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


# -- the bound --------------------------------------------------------------------------------
def parse_bound(text: str) -> tuple[str, float]:
    """`dcor=0.3`, `psnr=18` or `ssim=0.5` as (metric, value)."""
    metric, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not sep or metric not in METRICS or not np.isfinite(number):
        raise ParameterError(f"bad {{max_leakage}} {text!r}: expected METRIC=VALUE with "
                             f"METRIC one of {', '.join(METRICS)} (e.g. dcor=0.3)",
                             "max_leakage")
    return metric, number


def private_tensors(report: LeakageReport, metric: str, bound: float) -> frozenset[str]:
    """The tensors whose figure exceeds the bound: they may not cross the device's link."""
    return frozenset(name for name, t in report.tensors.items() if t.value(metric) > bound)


# -- samples ----------------------------------------------------------------------------------
def sample_shapes(model_path: str | Path, path: str | Path) -> dict[str, tuple[int, ...]]:
    """Per model input, the shape one sample of the calibration file gives it (a leading 1
    is added when the file's arrays lack the batch axis)."""
    model = onnx.load(str(model_path), load_external_data=False)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.input}
    with _open_npz(path) as data:
        shapes = {}
        for name, rank in ranks.items():
            if name in data.files:
                shape = tuple(data[name].shape[1:])
                shapes[name] = shape if len(shape) == rank else (1,) + shape
    return shapes


def _open_npz(path: str | Path):
    if not Path(path).is_file():
        raise WpkError(f"{path}: no calibration data here (expected an .npz file)")
    if not zipfile.is_zipfile(path):
        raise WpkError(f"{path}: not an .npz file (numpy.savez: one array per model input)")
    try:
        return np.load(str(path), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise WpkError(f"{path}: cannot read calibration data ({error})") from None


def load_samples(path: str | Path, graph: Graph, limit: int | None = None
                 ) -> dict[str, np.ndarray]:
    """The calibration file's arrays, one per model input, as [n, *input shape]."""
    samples: dict[str, np.ndarray] = {}
    with _open_npz(path) as data:
        for name in graph.inputs:
            if name not in data.files:
                raise WpkError(f"{path}: no array for model input {name!r} (has: "
                               f"{', '.join(data.files) or 'none'})")
            array = data[name][:limit]
            shape = graph.tensors[name].shape
            if int(np.prod(array.shape[1:])) != int(np.prod(shape)):
                raise WpkError(f"{path}: array {name!r} has samples of shape "
                               f"{list(array.shape[1:])}, the model input {list(shape)}")
            samples[name] = array.reshape((len(array),) + tuple(shape)).astype(
                graph.tensors[name].dtype)
    counts = {len(a) for a in samples.values()}
    if len(counts) > 1:
        raise WpkError(f"{path}: the arrays hold different numbers of samples {sorted(counts)}")
    if min(counts, default=0) < 8:
        raise WpkError(f"{path}: {min(counts, default=0)} samples; leakage needs at least 8")
    return samples


def synthetic_samples(graph: Graph, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The labelled fallback: random normal inputs (says little about real inputs)."""
    specs = {name: ((n,) + graph.tensors[name].shape, graph.tensors[name].dtype)
             for name in graph.inputs}
    return random_feeds(specs, seed, integer_values=2)


# -- fetching tensors in passes ---------------------------------------------------------------
def candidate_tensors(graph: Graph) -> list[str]:
    """Tensors that may cross a link: the inputs, and every node output read or returned."""
    names = list(graph.inputs)
    for node in graph.nodes:
        names += [o for o in node.outputs
                  if o in graph.consumers or o in graph.outputs]
    return list(dict.fromkeys(names))


def plan_passes(graph: Graph, names: list[str], n: int, budget: int = PASS_BYTES
                ) -> list[list[str]]:
    """Group tensors so that each pass holds at most `budget` bytes of float32 features (a
    tensor larger than that gets a pass of its own, spilled to disk)."""
    passes: list[list[str]] = [[]]
    held = 0
    for name in names:
        size = n * graph.tensors[name].numel * 4
        if passes[-1] and held + size > budget:
            passes.append([])
            held = 0
        passes[-1].append(name)
        held += size
    return [p for p in passes if p]


def _with_outputs(graph: Graph, names: list[str]) -> onnx.ModelProto:
    """The model answering with `names` (intermediate tensors) instead of its outputs."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    del model.graph.output[:]
    for name in names:
        info = graph.tensors[name]
        model.graph.output.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(info.dtype), list(info.shape)))
    return model


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as error:   # ORT's own exception types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WpkError(f"{graph_name(model)}: ONNX Runtime cannot run it to measure leakage: "
                       f"{first}") from None


def graph_name(model: onnx.ModelProto) -> str:
    return model.graph.name or "model"


def gram(features: np.ndarray) -> np.ndarray:
    """G = F F^T in float64, a block of columns at a time (F may live on disk)."""
    n = features.shape[0]
    out = np.zeros((n, n))
    for start in range(0, features.shape[1], GRAM_BLOCK):
        block = np.asarray(features[:, start:start + GRAM_BLOCK], dtype=np.float64)
        out += block @ block.T
    return out


def _features(n: int, numel: int, budget: int, spill: Path) -> np.ndarray:
    """[n, numel] float32 in memory, or in a file under `spill` when over the budget."""
    if n * numel * 4 <= budget:
        return np.zeros((n, numel), dtype=np.float32)
    return np.lib.format.open_memmap(spill / f"f{len(list(spill.iterdir()))}.npy", mode="w+",
                                     dtype=np.float32, shape=(n, numel))


def fetch_grams(graph: Graph, samples: Mapping[str, np.ndarray], names: list[str],
                budget: int = PASS_BYTES, progress: Callable[[str], None] | None = None
                ) -> dict[str, np.ndarray]:
    """One Gram matrix per tensor over the samples, computed pass by pass."""
    n = len(next(iter(samples.values())))
    grams: dict[str, np.ndarray] = {}
    for name in [m for m in names if m in graph.inputs]:
        grams[name] = gram(samples[name].reshape(n, -1))
    inner = [m for m in names if m not in graph.inputs]
    passes = plan_passes(graph, inner, n, budget)
    for number, group in enumerate(passes, 1):
        if progress:
            progress(f"pass {number}/{len(passes)}: {len(group)} tensors")
        session = _session(_with_outputs(graph, group))
        with tempfile.TemporaryDirectory(prefix="wpk-leakage-") as spill:
            held = [_features(n, graph.tensors[m].numel, budget, Path(spill)) for m in group]
            for i in range(n):
                feed = {name: samples[name][i] for name in graph.inputs}
                for store, value in zip(held, session.run(group, feed)):
                    store[i] = np.asarray(value, dtype=np.float32).reshape(-1)
            grams.update((m, gram(store)) for m, store in zip(group, held))
            del held
    return grams


# -- scoring ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attack:
    """The input as the attacker must rebuild it, and the split the decoder is fitted on."""

    inputs: np.ndarray                   # [n, d]: all model inputs, flattened side by side
    image: tuple[int, ...] | None        # (C, H, W) when the one input is an NCHW image
    train: np.ndarray
    test: np.ndarray
    data_range: float

    @classmethod
    def of(cls, graph: Graph, samples: Mapping[str, np.ndarray], seed: int = 0) -> "Attack":
        n = len(next(iter(samples.values())))
        inputs = np.concatenate([samples[name].reshape(n, -1).astype(np.float64)
                                 for name in graph.inputs], axis=1)
        shape = graph.tensors[graph.inputs[0]].shape
        image = tuple(shape[1:]) if len(graph.inputs) == 1 and len(shape) == 4 \
            and shape[0] == 1 else None
        order = np.random.default_rng(seed).permutation(n)
        span = float(inputs.max() - inputs.min()) or 1.0
        return cls(inputs, image, np.sort(order[: n // 2]), np.sort(order[n // 2:]), span)

    def reconstruct(self, tensor_gram: np.ndarray) -> np.ndarray:
        """The test samples as the ridge decoder rebuilds them from the tensor."""
        return stats.ridge_reconstruct(tensor_gram, self.inputs, self.train, self.test)

    def scores(self, tensor_gram: np.ndarray) -> tuple[float, float]:
        """(PSNR dB, SSIM) of the reconstruction of the held-out half."""
        truth, guess = self.inputs[self.test], self.reconstruct(tensor_gram)
        if self.image is not None:
            shape = (len(truth),) + self.image
            ssim = stats.ssim_images(truth.reshape(shape), guess.reshape(shape), self.data_range)
        else:
            ssim = stats.ssim_vectors(truth, guess, self.data_range)
        return stats.psnr(truth, guess, self.data_range), ssim


def measure(graph: Graph, samples: Mapping[str, np.ndarray], source: str,
            names: list[str] | None = None, reps: int = 100, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> LeakageReport:
    """The leakage figures of `names` (default: every candidate cut tensor)."""
    names = candidate_tensors(graph) if names is None else names
    n = len(next(iter(samples.values())))
    attack = Attack.of(graph, samples, seed)
    input_dist = stats.distances(attack.inputs @ attack.inputs.T)
    report = LeakageReport(graph.name, n, source)
    for name, g in fetch_grams(graph, samples, names, progress=progress).items():
        dist = stats.distances(g)
        low, high = stats.dcor_band(input_dist, dist, reps, seed=seed)
        psnr, ssim = attack.scores(g)
        producer = graph.producer.get(name)
        report.tensors[name] = TensorLeakage(
            name, None if producer is None else graph.nodes[producer].name,
            tuple(graph.tensors[name].shape), stats.dcor(input_dist, dist), low, high,
            psnr, ssim)
    report.tensors = {name: report.tensors[name] for name in names}
    return report


SYNTHETIC_SAMPLES = 128


def calibration_report(graph: Graph, path: str | Path | None, limit: int | None = None,
                       warn: Callable[[str], None] | None = None,
                       progress: Callable[[str], None] | None = None) -> LeakageReport:
    """Leakage on the calibration file's samples; without one, on random normal inputs,
    labelled synthetic and warned about (figures on noise say little about real inputs)."""
    if path is not None:
        return measure(graph, load_samples(path, graph, limit), str(path), progress=progress)
    if warn is not None:
        warn("no --calibration-data: leakage is measured on random normal inputs (synthetic; "
             "real inputs can leak far more)")
    samples = synthetic_samples(graph, limit or SYNTHETIC_SAMPLES)
    return measure(graph, samples, "synthetic", progress=progress)
