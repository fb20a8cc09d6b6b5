"""Predict a model's per-node times on a machine from its latency table, without running it.

For each operator family (`wpk.op_features`) the table's points give log10(ms) against
log10(FLOPs) and log10(bytes) (compute families) or log10(bytes) alone (memory-bound
ones). A node's time is read off its family's curve by a local linear regression: the
table's points weighted by a Gaussian of their distance in decades (`BANDWIDTH`), with the
slopes pulled toward the family's overall slopes (`RIDGE`), so that between points the
curve interpolates and beyond them it extrapolates along the local slope (time grows
linearly with work once a kernel is large, and flattens to a floor when it is tiny).

A node ONNX Runtime fuses into another kernel or folds away (`op_features.fusions`,
`op_patterns.all_fusions`) costs nothing of its own; every other node costs its kernel
plus the table's per-node overhead, plus the NCHWc reorders it needs (`op_layout`), and
the per-run overhead is shared equally by them, so that the node times add up to the
predicted whole-model time, as a profile's do. Kernel times are multiplied by the table's
in-network scale at the model's footprint (`op_calibrate`). A family the table lacks is
read off a stand-in (an activation of similar cost, `binary` for memory-bound operators);
which nodes needed one is reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wpk.graph import Graph
from wpk.op_calibrate import footprint_bytes, scale_for
from wpk.op_features import ACTIVATION_STAND_INS, NodeFeatures, log_features, node_features
from wpk.op_layout import nchwc_effects
from wpk.op_patterns import all_fusions
from wpk.op_table import OpTable, TableEntry

BANDWIDTH = 0.2       # decades: how far a table point still counts
RIDGE = 0.5           # pull of the local slopes toward the family's overall slopes
STAND_INS = {"matmul": ("gemm",), "gemm": ("matmul",), "layernorm": ("softmax", "binary"),
             "batchnorm": ("binary",), "softmax": ("binary",), "reduce": ("binary",),
             "maxpool": ("avgpool", "binary"), "avgpool": ("maxpool", "binary"),
             "copy": ("copy-Transpose", "copy-Concat", "binary"), "lrn": ("binary",),
             "other": ("binary",)}


class FamilyCurve:
    """One family's table points and the local regression that reads them."""

    def __init__(self, entries: list[TableEntry]):
        features = [log_features(NodeFeatures(e.family, e.flops, e.bytes)) for e in entries]
        self.x = np.array(features, dtype=float)
        self.y = np.log10(np.array([e.ms for e in entries], dtype=float))
        self.prior = self._overall_slopes()

    def _overall_slopes(self) -> np.ndarray:
        """A ridge fit of all the family's points (slopes toward 1 on the first feature:
        time proportional to work), the prior of every local fit."""
        dims = self.x.shape[1]
        default = np.zeros(dims)
        default[0] = 1.0
        centred = self.x - self.x.mean(axis=0)
        gram = centred.T @ centred + np.eye(dims)
        return np.linalg.solve(gram, centred.T @ (self.y - self.y.mean()) + default)

    def predict(self, query: tuple[float, ...], skip: int | None = None) -> float:
        """log10(ms) at `query` (log features); `skip` leaves one point out."""
        x, y = self.x, self.y
        if skip is not None:
            keep = np.arange(len(y)) != skip
            x, y = x[keep], y[keep]
        offset = x - np.asarray(query)
        distance2 = (offset ** 2).sum(axis=1) / BANDWIDTH ** 2
        weights = np.exp(-0.5 * (distance2 - distance2.min()))   # nearest point weighs 1
        design = np.column_stack([np.ones(len(y)), offset])
        penalty = np.diag([1e-9] + [RIDGE] * offset.shape[1])
        lhs = design.T @ (design * weights[:, None]) + penalty
        rhs = design.T @ (weights * y) + penalty @ np.concatenate([[0.0], self.prior])
        return float(np.linalg.solve(lhs, rhs)[0])


@dataclass
class Prediction:
    """Per-node times (ms, aligned with graph.nodes) and how each was found."""

    node_ms: np.ndarray
    families: list[str]
    fused: dict[int, str]
    stand_ins: dict[str, str] = field(default_factory=dict)   # family -> table family used
    overhead_ms: float = 0.0      # of the total: executor overheads, not kernels

    @property
    def total_ms(self) -> float:
        return float(self.node_ms.sum())


class Predictor:
    """A latency table made ready to price any model's nodes. `scale` is the in-network
    scale of the model last predicted (the table's own scale before any)."""

    def __init__(self, table: OpTable, calibrated: bool = True):
        self.table = table
        self.calibrated = calibrated
        self.scale = table.scale if calibrated else 1.0
        self.curves = {family: FamilyCurve(entries)
                       for family, entries in table.families().items()}

    def resolve(self, family: str) -> str | None:
        """The table family that prices `family`: itself, else a stand-in."""
        if family in self.curves:
            return family
        kind, _, detail = family.partition("-")
        candidates: list[str] = []
        if kind == "act":
            stand_in = ACTIVATION_STAND_INS.get(detail)
            candidates = [f"act-{stand_in}"] if stand_in else []
            candidates += ["act-Relu", "binary"]
        elif kind in ("conv", "depthwise", "grouped", "transposed"):
            size = int(detail[1:]) if detail[1:].isdigit() else 3
            candidates = self._nearest_kernels(kind, size)
            if kind in ("grouped", "transposed"):
                candidates += self._nearest_kernels("conv", size)
            candidates += ["conv-k3"]
        else:
            candidates = list(STAND_INS.get(kind, ()))
        return next((c for c in candidates + ["binary"] if c in self.curves), None)

    def _nearest_kernels(self, kind: str, size: int) -> list[str]:
        """The table's `kind` families, nearest kernel size first."""
        return sorted((f for f in self.curves if f.startswith(kind + "-k")
                       and f[len(kind) + 2:].isdigit()),
                      key=lambda f: abs(int(f[len(kind) + 2:]) - size))

    def kernel_ms(self, features: NodeFeatures) -> tuple[float, str | None]:
        """The kernel time of one node, and the table family it was read from."""
        if features.family == "view":
            return 0.0, "view"
        family = self.resolve(features.family)
        if family is None:
            return 0.0, None
        query = log_features(NodeFeatures(family, features.flops, features.bytes))
        return self.scale * 10 ** self.curves[family].predict(query), family

    def reorder_ms(self, nbytes: int) -> float:
        """One NCHWc layout reorder of a tensor of `nbytes`."""
        family = "reorder" if "reorder" in self.curves else self.resolve("copy")
        if family is None:
            return 0.0
        query = log_features(NodeFeatures(family, 0.0, float(nbytes)))
        return self.scale * 10 ** self.curves[family].predict(query)

    def sum_ms(self, nbytes: int) -> float:
        """What a residual Add fused into a convolution adds to it: reading the other
        tensor, a third of an Add's traffic (two inputs, one output)."""
        family = self.resolve("binary")
        if family is None:
            return 0.0
        query = log_features(NodeFeatures(family, nbytes / 4, 3.0 * nbytes))
        return self.scale * 10 ** self.curves[family].predict(query) / 3

    def scale_for(self, graph: Graph) -> float:
        """The in-network scale for this model: by its footprint where the table has the
        fit, else the table's one scale (1 uncalibrated)."""
        if not self.calibrated or self.table.footprint is None:
            return self.scale
        return scale_for(self.table.footprint, footprint_bytes(graph))

    def predict(self, graph: Graph) -> Prediction:
        """Every node's time on the table's machine (see the module's docstring)."""
        self.scale = self.scale_for(graph)
        found = all_fusions(graph)
        layout = nchwc_effects(graph, found, self.table.nchwc_block)
        fused = found.fused
        times = np.zeros(len(graph.nodes))
        families: list[str] = []
        stand_ins: dict[str, str] = {}
        overhead = 0.0
        for node in graph.nodes:
            features = found.replaced.get(node.index) or node_features(node, graph)
            families.append(features.family)
            reordered = layout.reorders.get(node.index, ())
            overhead += len(reordered) * self.table.node_overhead_ms
            reorders = sum(self.reorder_ms(b) + self.table.node_overhead_ms for b in reordered)
            if node.index in found.extra_read:      # the kernel reads one more tensor
                reorders += self.sum_ms(found.extra_read[node.index])
            if node.index in fused:
                times[node.index] = reorders
                continue
            ms, used = self.kernel_ms(features)
            if used != features.family:
                stand_ins[features.family] = used or "none"
            times[node.index] = ms + self.table.node_overhead_ms + reorders
            overhead += self.table.node_overhead_ms
        running = times > 0
        if running.any():
            times[running] += self.table.run_overhead_ms / running.sum()
            overhead += self.table.run_overhead_ms
        return Prediction(times, families, fused, stand_ins, overhead)

    def leave_one_out(self) -> dict[str, np.ndarray]:
        """Per family, each point's predicted / measured time with that point left out."""
        ratios = {}
        for family, curve in self.curves.items():
            if len(curve.y) < 3:
                continue
            predicted = np.array([curve.predict(tuple(curve.x[i]), skip=i)
                                  for i in range(len(curve.y))])
            ratios[family] = 10 ** (predicted - curve.y)
        return ratios
