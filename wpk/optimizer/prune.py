"""Magnitude pruning of Conv, Gemm and MatMul weights into structured patterns, measured.

A lossy step, explicit: `prune` zeroes weights in the pattern asked for and `measure` says
what that did to the layers' and the model's outputs on calibration data (or on random
inputs, said so), with accuracy only where labels were given.

Weights are read as W (outputs, K), K the reduction length (`sparsity.WeightSite`; for Conv
K = Cin/group * kh * kw in ONNX's order, kw fastest). In GEMM terms (Y = X B, B = W^T of
shape K x N) a row of W is an output column of B.

Patterns:
  N:M     in every group of M consecutive weights along K (W's rows, cut from k = 0), the
          M - N of smallest magnitude are zeroed: at most N non-zeros per group, sparsity
          1 - N/M (2:4 = 50 %, NVIDIA's Ampere pattern). Layers whose K is not a multiple of
          M are skipped.
  tile:G  tile-wise sparsity (Guo et al., SC 2020), in B's terms: first whole columns
          (output units) are pruned globally, the lowest L2 norm first, COLUMN_SHARE of the
          target sparsity; the outputs are cut into tiles of G in their own order (tile t
          holds outputs tG .. tG + G - 1; the pruned columns inside a tile stay dead), then
          whole rows inside a tile (one k across the tile's live outputs) are pruned, ranked
          by mean squared magnitude over all tiles of the layer together, until the layer
          reaches the target sparsity (it may pass it by less than one row). Each tile stays
          a dense GEMM of reduced K. Default G = 128 (the paper's). Tiles start at multiples
          of G rather than after the live columns are packed, so that with G a multiple of
          16 every block of 16 outputs of wpk's sparse kernels (direct_conv) lies in one tile
          and keeps only that tile's rows.
Skipped by default (listed in the report): the first and the last prunable layer in graph
order, layers with fewer than `min_weights` weights (too small to gain), weights shared by
several nodes, grouped convolutions for tile-wise, and the nodes named by `skip`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from wpk.errors import WpkError
from wpk.optimizer.sparsity import WeightSite, weight_sites

MIN_WEIGHTS = 2048
TILE_DEFAULT = 128
COLUMN_SHARE = 0.25
RANDOM_SAMPLES = 8


@dataclass(frozen=True)
class Pattern:
    kind: str          # "n:m" or "tile"
    n: int = 0
    m: int = 0
    g: int = 0

    @property
    def text(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "n:m" else f"tile:{self.g}"

    @property
    def implied_ratio(self) -> float | None:
        return 1 - self.n / self.m if self.kind == "n:m" else None


def parse_pattern(text: str) -> Pattern:
    """`2:4`, `N:M`, `tile` or `tile:G`; anything else is a one-line WpkError."""
    text = text.strip().lower()
    if match := re.fullmatch(r"(\d+):(\d+)", text):
        n, m = int(match[1]), int(match[2])
        if m < 2:
            raise WpkError(f"--pattern {text}: M must be at least 2")
        if n < 1:
            raise WpkError(f"--pattern {text}: N must be at least 1 (N non-zeros kept in "
                           f"every M)")
        if n >= m:
            raise WpkError(f"--pattern {text}: N must be less than M (N:M keeps N of every "
                           f"M weights)")
        return Pattern("n:m", n=n, m=m)
    if match := re.fullmatch(r"tile(?::(\d+))?", text):
        g = int(match[1]) if match[1] else TILE_DEFAULT
        if g < 1:
            raise WpkError(f"--pattern {text}: the tile width G must be at least 1")
        return Pattern("tile", g=g)
    raise WpkError(f"--pattern {text!r}: unknown pattern (2:4, N:M such as 1:4, tile or "
                   f"tile:G such as tile:64)")


def check_ratio(pattern: Pattern, ratio: float | None) -> float:
    """The sparsity to reach: N:M's own (a --ratio that disagrees is refused), tile's
    --ratio in (0, 1)."""
    if ratio is not None and not 0 < ratio < 1:
        raise WpkError(f"--ratio {ratio:g}: the share of weights to zero must be in (0, 1), "
                       f"e.g. 0.75")
    implied = pattern.implied_ratio
    if implied is not None:
        if ratio is not None and abs(ratio - implied) > 1e-9:
            raise WpkError(f"--ratio {ratio:g} does not match --pattern {pattern.text} "
                           f"(sparsity {implied:g}); leave --ratio out for N:M")
        return implied
    if ratio is None:
        raise WpkError(f"--pattern {pattern.text} needs --ratio, the share of weights to "
                       f"zero (e.g. 0.75)")
    return ratio


# --- masks on the (outputs, K) matrix ------------------------------------------------------

def nm_mask(matrix: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n largest magnitudes of every m consecutive weights along K."""
    rows, k = matrix.shape
    groups = np.abs(matrix).reshape(rows, k // m, m)
    keep = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    return mask.reshape(rows, k)


def tile_mask(matrix: np.ndarray, ratio: float, width: int,
              column_share: float = COLUMN_SHARE) -> np.ndarray:
    """Tile-wise mask (module doc): rows of `matrix` are B's columns (outputs)."""
    outputs, k = matrix.shape
    squares = np.square(matrix.astype(np.float64))
    mask = np.ones(matrix.shape, dtype=bool)
    target = int(round(ratio * matrix.size))
    dead = int(np.floor(outputs * ratio * column_share))
    if dead:
        order = np.argsort(squares.sum(axis=1), kind="stable")
        mask[order[:dead]] = False
    alive = np.flatnonzero(mask.any(axis=1))
    missing = target - dead * k
    if missing <= 0 or alive.size == 0:
        return mask
    tiles = [tile for start in range(0, outputs, width)
             if (tile := alive[(alive >= start) & (alive < start + width)]).size]
    scores = np.concatenate([squares[tile].mean(axis=0) for tile in tiles])   # one per k
    sizes = np.concatenate([np.full(k, tile.size) for tile in tiles])
    order = np.argsort(scores, kind="stable")
    count = int(np.searchsorted(np.cumsum(sizes[order]), missing)) + 1
    for index in order[:count]:
        mask[tiles[index // k], index % k] = False
    return mask


# --- choosing and pruning the layers -------------------------------------------------------

@dataclass
class LayerResult:
    node: str
    op: str
    weight: str
    shape: tuple[int, ...]
    pruned: bool
    reason: str = ""                 # why skipped
    pattern: str | None = None
    sparsity_before: float = 0.0
    sparsity: float = 0.0            # achieved (zeros / elements), after pruning
    own_deviation: float | None = None         # this layer alone pruned, dense inputs
    cumulative_deviation: float | None = None  # this layer's output in the pruned model

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "weight": self.weight,
                "shape": list(self.shape), "pruned": self.pruned, "reason": self.reason or None,
                "pattern": self.pattern, "sparsity_before": self.sparsity_before,
                "sparsity": self.sparsity, "own_deviation": self.own_deviation,
                "cumulative_deviation": self.cumulative_deviation}


def _skip_reason(site: WeightSite, index: int, sites: Sequence[WeightSite], pattern: Pattern,
                 skip: set[str], users: Mapping[str, int], min_weights: int,
                 keep_first_last: bool) -> str:
    size = int(np.prod(site.shape))
    if site.node in skip:
        return "--skip"
    if site.problem:
        return site.problem
    if users[site.weight] > 1:
        return f"weight shared by {users[site.weight]} nodes"
    if keep_first_last and index == 0:
        return "first prunable layer (kept dense; --prune-first-last prunes it)"
    if keep_first_last and index == len(sites) - 1:
        return "last prunable layer (kept dense; --prune-first-last prunes it)"
    if size < min_weights:
        return f"{size} weights (< --min-weights {min_weights}): too small to gain"
    k = size // site.shape[0] if site.op == "Conv" else \
        (site.shape[1] if site.op == "Gemm" and site.trans_b else site.shape[0])
    if pattern.kind == "n:m" and k % pattern.m:
        return f"K = {k} is not a multiple of M = {pattern.m}"
    if pattern.kind == "tile" and site.op == "Conv" and site.group > 1:
        return f"grouped convolution (group {site.group}): its tiles are no dense GEMM"
    return ""


def prune(model: onnx.ModelProto, pattern: Pattern, ratio: float | None = None,
          skip: Iterable[str] = (), min_weights: int = MIN_WEIGHTS,
          keep_first_last: bool = True) -> tuple[onnx.ModelProto, list[LayerResult]]:
    """A pruned copy of `model` and one LayerResult per prunable weight (pruned or why not).
    Raises WpkError where nothing is prunable or a --skip names no prunable node."""
    ratio = check_ratio(pattern, ratio)
    sites = weight_sites(model)
    if not sites:
        raise WpkError("the model has no prunable layer (no Conv, Gemm or MatMul with a "
                       "constant weight)")
    skip = set(skip)
    unknown = sorted(skip - {s.node for s in sites})
    if unknown:
        names = ", ".join(s.node for s in sites[:8]) + (" ..." if len(sites) > 8 else "")
        raise WpkError(f"--skip {unknown[0]}: no prunable node of that name (prunable: "
                       f"{names})")
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in set(node.input):
            users[name] = users.get(name, 0) + 1
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    initializers = {t.name: t for t in pruned.graph.initializer}
    results = []
    for index, site in enumerate(sites):
        reason = _skip_reason(site, index, sites, pattern, skip, users, min_weights,
                              keep_first_last)
        result = LayerResult(site.node, site.op, site.weight, site.shape, pruned=not reason,
                             reason=reason)
        results.append(result)
        if site.problem:
            continue
        tensor = initializers[site.weight]
        array = numpy_helper.to_array(tensor)
        result.sparsity_before = result.sparsity = float((array == 0).mean()) if array.size \
            else 0.0
        if reason:
            continue
        matrix = site.matrix(array)
        mask = nm_mask(matrix, pattern.n, pattern.m) if pattern.kind == "n:m" else \
            tile_mask(matrix, ratio, pattern.g)
        new = site.from_matrix(np.where(mask, matrix, np.zeros((), matrix.dtype)))
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new, array.dtype),
                                                tensor.name))
        result.pattern = pattern.text
        result.sparsity = float((new == 0).mean())
    if not any(r.pruned for r in results):
        listed = "; ".join(f"{r.node}: {r.reason}" for r in results[:4])
        raise WpkError(f"no layer left to prune ({listed}{' ...' if len(results) > 4 else ''})")
    return pruned, results


# --- measuring what pruning did ------------------------------------------------------------

@dataclass
class OutputDeviation:
    name: str
    relative: float        # ||pruned - dense|| / ||dense|| over all samples
    max_abs: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "relative": self.relative, "max_abs": self.max_abs}


@dataclass
class Accuracy:
    labels: str
    samples: int
    dense: float
    pruned: float
    top1_agreement: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Measurement:
    data: str                          # where the inputs came from
    samples: int
    random_inputs: bool
    outputs: list[OutputDeviation] = field(default_factory=list)
    accuracy: Accuracy | None = None


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    return model


def _probe(dense: onnx.ModelProto, pruned: onnx.ModelProto, layers: Sequence[LayerResult]
           ) -> tuple[onnx.ModelProto, onnx.ModelProto, dict[str, tuple[str, str]]]:
    """(dense model that also computes each pruned layer alone with its pruned weight and
    the dense layer's inputs, pruned model with the layers' outputs exposed,
    {node: (layer output, its pruned-alone twin)})."""
    from wpk.naming import node_names

    probe = onnx.ModelProto()
    probe.CopyFrom(dense)
    pruned_probe = onnx.ModelProto()
    pruned_probe.CopyFrom(pruned)
    weights = {t.name: t for t in pruned.graph.initializer}
    wanted = {r.node for r in layers if r.pruned}
    twins: dict[str, tuple[str, str]] = {}
    for node, name in zip(list(probe.graph.node), node_names(list(probe.graph.node))):
        if name not in wanted:
            continue
        twin = onnx.NodeProto()
        twin.CopyFrom(node)
        twin.name = f"{name}__wpk_pruned_alone"
        weight = onnx.TensorProto()
        weight.CopyFrom(weights[node.input[1]])
        weight.name = f"{node.input[1]}__wpk_pruned_alone"
        probe.graph.initializer.append(weight)
        twin.input[1] = weight.name
        del twin.output[:]
        twin.output.append(f"{node.output[0]}__wpk_pruned_alone")
        probe.graph.node.append(twin)
        twins[name] = (node.output[0], twin.output[0])
    _with_outputs(probe, [n for pair in twins.values() for n in pair])
    _with_outputs(pruned_probe, [pair[0] for pair in twins.values()])
    return probe, pruned_probe, twins


def random_samples(model: onnx.ModelProto, count: int = RANDOM_SAMPLES, seed: int = 0
                   ) -> list[dict[str, np.ndarray]]:
    """`count` feeds of standard normal floats (wpk.feeds), symbolic dimensions as 1."""
    from onnx.helper import tensor_dtype_to_np_dtype

    from wpk.feeds import random_feeds

    initializers = {t.name for t in model.graph.initializer}
    specs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                 for d in tensor.shape.dim]
        specs[value.name] = (shape, tensor_dtype_to_np_dtype(tensor.elem_type))
    return [random_feeds(specs, seed + i) for i in range(count)]


def measure(dense: onnx.ModelProto, pruned: onnx.ModelProto, layers: Sequence[LayerResult],
            samples: Sequence[Mapping[str, np.ndarray]], data: str, random_inputs: bool,
            labels: np.ndarray | None = None, labels_source: str = "") -> Measurement:
    """Fill each pruned layer's deviations in `layers` and return the model's: relative L2
    deviation of every output over all samples; with `labels` (one per row of the first
    output's (rows, classes) view), dense and pruned accuracy and top-1 agreement."""
    probe, pruned_probe, twins = _probe(dense, pruned, layers)
    dense_session, pruned_session = _session(probe), _session(pruned_probe)
    outputs = [o.name for o in dense.graph.output]
    dense_names = [o.name for o in dense_session.get_outputs()]
    pruned_names = [o.name for o in pruned_session.get_outputs()]
    sums: dict[str, list[float]] = {}       # name -> [sum sq diff, sum sq ref]
    max_abs: dict[str, float] = {}
    firsts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(key: str, ref: np.ndarray, got: np.ndarray) -> None:
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        acc = sums.setdefault(key, [0.0, 0.0])
        acc[0] += float(np.square(got64 - ref64).sum())
        acc[1] += float(np.square(ref64).sum())
        if ref.size:
            max_abs[key] = max(max_abs.get(key, 0.0), float(np.abs(got64 - ref64).max()))

    for feed in samples:
        ref = dict(zip(dense_names, dense_session.run(None, dict(feed))))
        got = dict(zip(pruned_names, pruned_session.run(None, dict(feed))))
        for name in outputs:
            add(f"out:{name}", ref[name], got[name])
        for node, (out, twin) in twins.items():
            add(f"own:{node}", ref[out], ref[twin])
            add(f"cum:{node}", ref[out], got[out])
        firsts.append((ref[outputs[0]], got[outputs[0]]))

    def relative(key: str) -> float:
        diff, norm = sums[key]
        return float(np.sqrt(diff / norm)) if norm > 0 else float(np.sqrt(diff))

    for layer in layers:
        if layer.node in twins:
            layer.own_deviation = relative(f"own:{layer.node}")
            layer.cumulative_deviation = relative(f"cum:{layer.node}")
    result = Measurement(data, len(samples), random_inputs,
                         [OutputDeviation(n, relative(f"out:{n}"), max_abs.get(f"out:{n}", 0.0))
                          for n in outputs])
    if labels is not None:
        result.accuracy = _accuracy(firsts, labels, labels_source, outputs[0])
    return result


def _accuracy(firsts: Sequence[tuple[np.ndarray, np.ndarray]], labels: np.ndarray,
              source: str, output: str) -> Accuracy:
    classes = firsts[0][0].shape[-1] if firsts[0][0].ndim else 0
    if classes < 2:
        raise WpkError(f"{source}: output {output!r} has shape {list(firsts[0][0].shape)}: no "
                       f"class axis (last) to take the top-1 of")
    dense = np.concatenate([r.reshape(-1, classes).argmax(axis=1) for r, _ in firsts])
    pruned = np.concatenate([g.reshape(-1, classes).argmax(axis=1) for _, g in firsts])
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != dense.shape[0]:
        raise WpkError(f"{source}: {labels.shape[0]} labels for {dense.shape[0]} predictions "
                       f"(one label per row of output {output!r})")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or \
                not np.array_equal(labels, np.round(labels)):
            raise WpkError(f"{source}: labels must be class indices (integers), not "
                           f"{labels.dtype}")
        labels = labels.astype(np.int64)
    return Accuracy(source, int(labels.shape[0]), float((dense == labels).mean()),
                    float((pruned == labels).mean()), float((dense == pruned).mean()))


def report_json(model: str, output: str, pattern: Pattern, ratio: float,
                layers: Sequence[LayerResult], measurement: Measurement) -> dict[str, Any]:
    pruned = [r for r in layers if r.pruned]
    total = sum(int(np.prod(r.shape)) for r in pruned)
    zero = sum(r.sparsity * int(np.prod(r.shape)) for r in pruned)
    return {
        "model": model, "output": output, "pattern": pattern.text, "ratio": ratio,
        "pruned_layers": len(pruned), "skipped_layers": len(layers) - len(pruned),
        "pruned_weights_sparsity": zero / total if total else 0.0,
        "data": {"source": measurement.data, "samples": measurement.samples,
                 "random_inputs": measurement.random_inputs},
        "outputs": [o.to_json() for o in measurement.outputs],
        "accuracy": measurement.accuracy.to_json() if measurement.accuracy else None,
        "layers": [r.to_json() for r in layers],
    }
