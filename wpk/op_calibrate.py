"""How much slower an operator runs inside a network than alone, on this machine.

A lone operator timed over and over runs in a steadier state than the same operator inside
a network (the core's frequency under sustained vector work, the caches and prefetchers
shared with the layers around it). `wpk-profile --ops` therefore also times three of wpk's
own example networks whole (`wpk.examples`: a ResNet-18-like and a MobileNetV2-like CNN,
an MLP; never a model the table is later asked about), predicts them from the fresh table,
and records the median ratio of measured to predicted kernel time as `calibration.scale`.
The predictor multiplies every kernel time by it.
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


def calibration_networks() -> dict[str, onnx.ModelProto]:
    return {"resnet_like": examples.resnet_like(width=64),
            "mobilenet_like": examples.mobilenet_like(),
            "mlp": examples.mlp()}


def network_scale(document: dict[str, Any],
                  time_wall: Callable[[onnx.ModelProto, str], float]) -> dict[str, Any]:
    """The `calibration` object of a table: each network's measured and predicted time
    (ms) and the scale; `time_wall(model, label)` measures a model's median wall time."""
    from wpk.op_predict import Predictor

    predictor = Predictor(OpTable.from_document({**document, "calibration": {"scale": 1.0}}))
    networks: dict[str, dict[str, float]] = {}
    ratios = []
    for name, model in calibration_networks().items():
        graph = Graph.load(model, name=name)
        prediction = predictor.predict(graph)
        measured = time_wall(model, name)
        overhead = prediction.overhead_ms
        kernels = prediction.total_ms - overhead
        if kernels > 0:
            ratios.append((measured - overhead) / kernels)
        networks[name] = {"measured_ms": round(measured, 4),
                          "predicted_ms": round(prediction.total_ms, 4)}
    scale = float(np.clip(np.median(ratios), *SCALE_LIMITS)) if ratios else 1.0
    return {"scale": round(scale, 4), "networks": networks}
