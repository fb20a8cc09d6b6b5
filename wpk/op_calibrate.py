"""How much slower (or faster) an operator runs inside a network than alone, here.

A lone operator timed over and over runs in another state than the same operator inside a
network (the core's frequency under sustained vector work, the caches and prefetchers
shared with the layers around it). `wpk-profile --ops` therefore also times five of wpk's
own example networks whole (`wpk.examples`: ResNet-like CNNs of three widths, a
MobileNetV2-like CNN, an MLP; never a model the table is later asked about), predicts them
from the fresh table, and fits the ratio of measured to predicted kernel time against how
many bytes a run touches (`calibration.footprint`): a small network stays in the caches a
lone operator timed cold does not find, a large one streams its weights from memory. The
predictor multiplies every kernel time of a model by the fit's value at its footprint.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx

from wpk import examples
from wpk.graph import Graph
from wpk.op_table import OpTable

# A scale outside these bounds means the machine changed under the measurement.
SCALE_LIMITS = (0.5, 2.0)
RIDGE = 0.1           # pull of the footprint slope toward 0 (decades squared)


def footprint_bytes(graph: Graph) -> int:
    """What a run of the network touches once: its weights and every tensor it writes."""
    weights = sum(graph.tensors[t].nbytes for t in graph.initializers if t in graph.tensors)
    return weights + sum(graph.tensors[t].nbytes for node in graph.nodes for t in node.outputs)


def calibration_networks() -> dict[str, onnx.ModelProto]:
    """wpk's own example networks, from a few MB to a few hundred touched per run."""
    return {"resnet_like_w16": examples.resnet_like(width=16),
            "mobilenet_like": examples.mobilenet_like(),
            "mlp": examples.mlp(),
            "resnet_like_w64": examples.resnet_like(width=64),
            "resnet_like_w128": examples.resnet_like(width=128)}


def network_scale(document: dict[str, Any],
                  time_wall: Callable[[onnx.ModelProto, str], float]) -> dict[str, Any]:
    """The `calibration` object of a table: each network's measured and predicted time
    (ms), footprint and ratio; the median ratio (`scale`); and log(ratio) against
    log10(footprint) as a line (`footprint`: a ridge fit, flat beyond the networks'
    range). `time_wall(model, label)` measures a model's median wall time."""
    from wpk.op_predict import Predictor

    predictor = Predictor(OpTable.from_document({**document, "calibration": {"scale": 1.0}}))
    networks: dict[str, dict[str, float]] = {}
    for name, model in calibration_networks().items():   # built alike every time (seeded)
        graph = Graph.load(model, name=name)
        prediction = predictor.predict(graph)
        measured = time_wall(model, name)
        kernels = prediction.total_ms - prediction.overhead_ms
        ratio = (measured - prediction.overhead_ms) / kernels if kernels > 0 else 1.0
        networks[name] = {"measured_ms": round(measured, 4),
                          "predicted_ms": round(prediction.total_ms, 4),
                          "footprint_mb": round(footprint_bytes(graph) / 1e6, 3),
                          "ratio": round(float(np.clip(ratio, *SCALE_LIMITS)), 4)}
    ratios = np.array([n["ratio"] for n in networks.values()])
    x = np.log10([n["footprint_mb"] * 1e6 for n in networks.values()])
    y = np.log(ratios)
    center = float(x.mean())
    slope = float(((x - center) * (y - y.mean())).sum() / (((x - center) ** 2).sum() + RIDGE))
    return {"scale": round(float(np.median(ratios)), 4), "networks": networks,
            "footprint": {"center": round(center, 4), "intercept": round(float(y.mean()), 4),
                          "slope": round(slope, 4), "low": round(float(x.min()), 4),
                          "high": round(float(x.max()), 4)}}


def scale_for(footprint: dict[str, float], nbytes: float) -> float:
    """The in-network scale of a network touching `nbytes` per run, from the fit."""
    x = np.clip(np.log10(max(nbytes, 1.0)), footprint["low"], footprint["high"])
    value = np.exp(footprint["intercept"] + footprint["slope"] * (x - footprint["center"]))
    return float(np.clip(value, *SCALE_LIMITS))
