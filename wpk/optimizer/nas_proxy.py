"""A training-free accuracy proxy: the NASWOT score (Mellor et al., ICML 2021).

At initialization, feed a batch of N inputs and record which ReLUs fire for each input: a
binary code per input. Networks whose codes tell the inputs apart (few shared patterns)
tend to train to higher accuracy. The score is log |det K| with K[i, j] = the number of
ReLUs on which inputs i and j agree (both on or both off).

Limits, stated plainly: the score ranks architectures of one space on one input
distribution; it correlates with trained accuracy (Kendall tau around 0.5-0.6 on the NAS
benchmarks its authors tried), it does not predict an accuracy and never replaces training.
Here the inputs are random images unless real ones are given (`inputs`), and it is computed
at a reduced resolution (`image_size`) to keep memory and time small.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from wpk.optimizer.nas_space import Architecture, build

DEFAULT_BATCH = 16
DEFAULT_IMAGE = 64


def _with_relu_outputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    relus = [node.output[0] for node in model.graph.node if node.op_type == "Relu"]
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in relus)
    return model, relus


def naswot_score(arch: Architecture, image_size: int = DEFAULT_IMAGE,
                 batch: int = DEFAULT_BATCH, seed: int = 0,
                 inputs: np.ndarray | None = None) -> float:
    """log |det K| of the architecture at initialization (higher ranks better)."""
    if inputs is None:
        rng = np.random.default_rng(seed)
        inputs = rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    batch, _, image_size = inputs.shape[0], inputs.shape[1], inputs.shape[2]
    model, relus = _with_relu_outputs(build(arch, image_size, batch=batch, seed=seed))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    agree = np.zeros((batch, batch))
    for activation in session.run(relus, {"image": inputs}):
        codes = (activation.reshape(batch, -1) > 0).astype(np.float32)
        agree += codes @ codes.T + (1 - codes) @ (1 - codes).T
    sign, logdet = np.linalg.slogdet(agree)
    return float(logdet) if sign > 0 else float("-inf")
