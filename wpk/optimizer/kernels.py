"""Bind ONNX nodes to kernel computes, and run generated kernels.

A `KernelSpec` is the serializable description of one generated kernel in an optimized slice:
which compute (op + shape parameters), which schedule, and where each buffer comes from
(an activation tensor or a stored weight). Loading rebuilds the compute, lowers and compiles it
(gcc's output is cached by source hash), so an optimized directory carries no binaries.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from wpk.optimizer import ops
from wpk.optimizer.build import CKernel
from wpk.optimizer.codegen_c import lower_c
from wpk.optimizer.dsl import Compute
from wpk.optimizer.space import Config

KERNEL_OPS = ("Conv", "Gemm", "MatMul", "MaxPool", "AveragePool", "GlobalAveragePool")


@dataclass
class KernelSpec:
    op: str                               # builder in wpk.optimizer.ops
    params: dict[str, Any]
    sources: list[str]                    # per buffer (compute order, inputs then output):
    #                                      tensor name, or "weight:NAME"
    output: str                           # output tensor name
    node: str                             # ONNX node name(s) it replaces
    schedule: Config = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def compute(self) -> Compute:
        return getattr(ops, self.op)(**self.params)

    def signature(self) -> str:
        """The operator signature used as the tuning-log task key."""
        return f"{self.op}:" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())
                                        if k != "name")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("weights")
        return data


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _pads(node: onnx.NodeProto, spatial: tuple[int, int], kernel: tuple[int, int],
          strides: tuple[int, int], dilations: tuple[int, int]) -> tuple[int, int, int, int]:
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return (pads[0][0], pads[1][0], pads[0][1], pads[1][1])
    if auto == "VALID":
        return (0, 0, 0, 0)
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    return (pads[0], pads[1], pads[2], pads[3])


def spec_for_node(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]],
                  consts: Mapping[str, np.ndarray], relu_output: str | None = None
                  ) -> KernelSpec | None:
    """A kernel spec for `node` (with a following Relu fused when `relu_output` is given),
    or None when our kernels do not cover this node (dtype, rank, dynamic weights...)."""
    relu = relu_output is not None
    out = relu_output or node.output[0]
    name = "k_" + "".join(ch if ch.isalnum() else "_" for ch in node.name or node.output[0])
    try:
        x_shape = shapes[node.input[0]]
    except KeyError:
        return None
    if node.op_type == "Conv":
        return _conv_spec(node, x_shape, consts, relu, out, name)
    if node.op_type in ("Gemm", "MatMul"):
        return _gemm_spec(node, x_shape, consts, relu, out, name)
    if relu or len(x_shape) != 4:
        return None
    return _pool_spec(node, x_shape, out, name)


def _conv_spec(node: onnx.NodeProto, x_shape: tuple[int, ...],
               consts: Mapping[str, np.ndarray], relu: bool, out: str, name: str
               ) -> KernelSpec | None:
    if len(x_shape) != 4 or node.input[1] not in consts:
        return None
    weight = consts[node.input[1]].astype(np.float32)
    n, c, h, w = x_shape
    m, _, kh, kw = weight.shape
    strides = tuple(_attr(node, "strides", [1, 1]))
    dilations = tuple(_attr(node, "dilations", [1, 1]))
    params = dict(n=n, c=c, h=h, w=w, m=m, kh=kh, kw=kw, stride=strides,
                  pads=_pads(node, (h, w), (kh, kw), strides, dilations),
                  dilations=dilations, group=_attr(node, "group", 1),
                  bias=len(node.input) > 2 and bool(node.input[2]), relu=relu, name=name)
    weights = {"Wt": weight}
    sources = [node.input[0], "weight:Wt"]
    if params["bias"]:
        if node.input[2] not in consts:
            return None
        weights["B"] = consts[node.input[2]].astype(np.float32)
        sources.append("weight:B")
    return KernelSpec("conv2d", params, sources + [out], out, node.name, weights=weights)


def _gemm_spec(node: onnx.NodeProto, x_shape: tuple[int, ...],
               consts: Mapping[str, np.ndarray], relu: bool, out: str, name: str
               ) -> KernelSpec | None:
    """Gemm, or MatMul of a matrix by a constant one."""
    if node.input[1] not in consts or len(x_shape) != 2:
        return None
    b = consts[node.input[1]].astype(np.float32)
    if b.ndim != 2:
        return None
    trans_a = bool(_attr(node, "transA", 0)) if node.op_type == "Gemm" else False
    trans_b = bool(_attr(node, "transB", 0)) if node.op_type == "Gemm" else False
    m = x_shape[1] if trans_a else x_shape[0]
    k = x_shape[0] if trans_a else x_shape[1]
    n_out = b.shape[0] if trans_b else b.shape[1]
    weights = {"Bm": b}
    bias = None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        if node.input[2] not in consts:
            return None
        bias, weights["C"] = _gemm_bias(consts[node.input[2]].astype(np.float32), m, n_out)
    params = dict(m=m, n=n_out, k=k, trans_a=trans_a, trans_b=trans_b,
                  alpha=float(_attr(node, "alpha", 1.0)), beta=float(_attr(node, "beta", 1.0)),
                  bias=bias, relu=relu, name=name)
    sources = [node.input[0], "weight:Bm"] + (["weight:C"] if bias else []) + [out]
    return KernelSpec("gemm", params, sources, out, node.name, weights=weights)


def _gemm_bias(c_val: np.ndarray, m: int, n_out: int) -> tuple[str, np.ndarray]:
    """Gemm's C as the kernel takes it: ("row", one value per output column) or ("full",
    the whole m x n_out matrix, broadcast where C is smaller)."""
    if c_val.size == n_out:
        return "row", c_val.reshape(n_out)
    if c_val.size == m * n_out:
        return "full", c_val.reshape(m, n_out)
    return "full", np.broadcast_to(c_val, (m, n_out)).copy()


def _pool_spec(node: onnx.NodeProto, x_shape: tuple[int, ...], out: str, name: str
               ) -> KernelSpec | None:
    n, c, h, w = x_shape
    if node.op_type in ("MaxPool", "AveragePool"):
        if _attr(node, "ceil_mode", 0) or any(d != 1 for d in _attr(node, "dilations", [1, 1])) \
                or len(node.output) > 1 and node.output[1]:
            return None
        kernel = tuple(_attr(node, "kernel_shape", [1, 1]))
        strides = tuple(_attr(node, "strides", [1, 1]))
        params = dict(kind="max" if node.op_type == "MaxPool" else "avg", n=n, c=c, h=h, w=w,
                      kh=kernel[0], kw=kernel[1], stride=strides,
                      pads=_pads(node, (h, w), kernel, strides, (1, 1)),
                      count_include_pad=bool(_attr(node, "count_include_pad", 0)), name=name)
        return KernelSpec("pool2d", params, [node.input[0], out], out, node.name)
    if node.op_type == "GlobalAveragePool":
        return KernelSpec("global_avg_pool", dict(n=n, c=c, h=h, w=w, name=name),
                          [node.input[0], out], out, node.name)
    return None


class BoundKernel:
    """A compiled kernel with its weights bound: call with the activation tensors."""

    def __init__(self, spec: KernelSpec, schedule: Config | None = None):
        self.spec = spec
        self.compute = spec.compute()
        config = schedule or spec.schedule or ops.default_schedule_config(self.compute)
        self.schedule = ops.make_schedule(self.compute, config)
        self.source = lower_c(self.compute, self.schedule)
        self.kernel = CKernel(self.source, self.compute.name, len(self.compute.buffers))
        self.out_shape = self.compute.output.shape
        self._weights = {k: np.ascontiguousarray(v, np.float32) for k, v in spec.weights.items()}
        self.activations = [s for s in spec.sources[:-1] if not s.startswith("weight:")]

    def __call__(self, env: Mapping[str, np.ndarray]) -> np.ndarray:
        out = np.empty(self.out_shape, np.float32)
        arrays = []
        for source in self.spec.sources[:-1]:
            if source.startswith("weight:"):
                arrays.append(self._weights[source[7:]])
            else:
                arrays.append(np.ascontiguousarray(env[source], np.float32))
        arrays.append(out)
        self.kernel(*arrays)
        return out


def load_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
