"""The operators `wpk-profile --ops` times: single-operator ONNX models at the shapes common in
vision and transformer networks.

`grid("default")` is small enough to time in a few minutes on a small CPU (about 200 cases);
`grid("full")` adds more channel widths, spatial sizes and sequence lengths (about four
times as many) for a table that leans less on interpolation. Each case is one node, so that
its time is one point on its family's curve (`wpk.op_features`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

GRIDS = ("default", "full")
OPSET = 17


@dataclass(frozen=True)
class OpCase:
    """One single-operator model: `op_type` with `attrs` on inputs of these shapes."""

    name: str
    op_type: str
    inputs: tuple[tuple[int, ...], ...]           # runtime inputs, in the node's order
    weights: tuple[tuple[int, ...], ...] = ()     # initializers after the inputs
    attrs: dict = field(default_factory=dict)
    opset: int = OPSET
    # constant inputs after the weights, (dtype, values); None for a skipped optional input
    constants: tuple[tuple[str, tuple] | None, ...] = ()

    def model(self, seed: int = 0) -> onnx.ModelProto:
        """The case as an ONNX model; weights random (their values do not change times)."""
        rng = np.random.default_rng(seed)
        names = [f"x{i}" for i in range(len(self.inputs))]
        weight_names = [f"w{i}" for i in range(len(self.weights))]
        weights = [numpy_helper.from_array(
            (rng.standard_normal(shape) * 0.1).astype(np.float32), name)
            for name, shape in zip(weight_names, self.weights)]
        constant_names = []
        for i, constant in enumerate(self.constants):
            constant_names.append("" if constant is None else f"c{i}")
            if constant is not None:
                weights.append(numpy_helper.from_array(
                    np.array(constant[1], dtype=constant[0]), f"c{i}"))
        node = helper.make_node(self.op_type, names + weight_names + constant_names, ["y"],
                                **self.attrs)
        graph = helper.make_graph(
            [node], self.name.replace(" ", "_"),
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
             for n, s in zip(names, self.inputs)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 9
        return shape_inference.infer_shapes(model)   # the output's shape, as files have it


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


# -- convolutions --------------------------------------------------------------------------
# (channels, spatial size) along a typical vision backbone
STAGES = ((32, 112), (64, 56), (128, 28), (256, 14), (512, 7))
FULL_STAGES = STAGES + ((16, 112), (24, 56), (40, 28), (80, 14), (160, 14), (320, 7),
                        (64, 112), (128, 56), (256, 28), (512, 14), (1024, 7), (96, 56),
                        (192, 28), (384, 14), (768, 7))
GROUPED = ((240, 28, 3), (480, 14, 3), (960, 7, 3), (128, 56, 32), (256, 28, 32),
           (512, 14, 32), (1024, 7, 32), (256, 28, 4))
TRANSPOSED = ((256, 20), (128, 40), (64, 80), (32, 160))
DEPTHWISE = ((32, 112), (96, 112), (144, 56), (192, 28), (384, 14), (576, 14), (960, 7))
FULL_DEPTHWISE = DEPTHWISE + ((16, 112), (72, 56), (240, 28), (480, 14), (672, 14),
                              (1152, 7), (120, 28), (200, 14))


def conv(c_in: int, c_out: int, size: int, kernel: int, stride: int = 1,
         groups: int = 1) -> OpCase:
    kind = "Conv" if groups == 1 else "depthwise" if groups == c_in else f"Conv g{groups}"
    return OpCase(f"{kind} k{kernel} s{stride} {c_in}x{size}x{size}->{c_out}", "Conv",
                  ((1, c_in, size, size),), ((c_out, c_in // groups, kernel, kernel),),
                  {"pads": [kernel // 2] * 4, "strides": [stride, stride], "group": groups})


def transposed(c_in: int, c_out: int, size: int, kernel: int) -> OpCase:
    """ConvTranspose doubling the spatial size (kernel 2, or 4 with padding 1)."""
    pads = [(kernel - 2) // 2] * 4
    return OpCase(f"ConvTranspose k{kernel} s2 {c_in}x{size}x{size}->{c_out}", "ConvTranspose",
                  ((1, c_in, size, size),), ((c_in, c_out, kernel, kernel),),
                  {"strides": [2, 2], "pads": pads})


def _conv_cases(full: bool) -> Iterator[OpCase]:
    stages = FULL_STAGES if full else STAGES
    yield conv(3, 32, 224, 3, 2)
    yield conv(3, 64, 224, 7, 2)
    yield conv(3, 16, 224, 3, 2)
    for c, s in stages:                                          # 1x1: bottlenecks, expansions
        yield conv(c, c, s, 1)
        yield conv(c, 4 * c, s, 1)
        yield conv(4 * c, c, s, 1)
        if s > 7:
            yield conv(c, 2 * c, s, 1, 2)
            yield conv(c, c, 2 * s, 1)
    for c, s in stages:                                          # 3x3
        yield conv(c, c, s, 3)
        if s > 7:
            yield conv(c, 2 * c, s, 3, 2)
            yield conv(c // 2, c // 2, 2 * s, 3)
    for c, s in stages if full else stages[1:]:                  # 5x5 and 7x7: rarer
        yield conv(c, c, s, 5)
        if s > 7:
            yield conv(c, 2 * c, s, 5, 2)
        if s >= 14 or full:
            yield conv(c, c, s, 7)
    for c, s, groups in GROUPED:                                 # grouped (ShuffleNet, ResNeXt)
        yield conv(c, c, s, 1 if groups < 8 else 3, groups=groups)
    for c, s in TRANSPOSED:                                      # decoders' upsampling
        for kernel in (2, 4) if full else (2,):
            yield transposed(c, c // 2, s, kernel)
    for c, s in (FULL_DEPTHWISE if full else DEPTHWISE):         # depthwise
        for kernel in (3, 5, 7) if full or s <= 56 else (3, 5):
            yield conv(c, c, s, kernel, groups=c)
        if s > 7:
            yield conv(c, c, s, 3, 2, groups=c)
            yield conv(c, c, s, 5, 2, groups=c)


# -- matrix products -------------------------------------------------------------------------
GEMMS = ((1, 512, 1000), (1, 1024, 1000), (1, 1280, 1000), (1, 2048, 1000), (1, 4096, 4096),
         (1, 256, 256), (128, 768, 768), (128, 768, 3072), (128, 3072, 768), (197, 768, 768),
         (197, 768, 2304), (197, 3072, 768), (64, 256, 256), (50, 512, 2048), (16, 64, 64))
FULL_GEMMS = GEMMS + ((1, 9216, 4096), (1, 25088, 4096), (1, 768, 768), (1, 1024, 1024),
                      (32, 768, 768), (256, 768, 768), (256, 768, 3072), (512, 768, 768),
                      (384, 384, 1536), (384, 1536, 384), (49, 96, 384), (196, 384, 1536),
                      (128, 128, 128), (256, 256, 1024), (1000, 64, 64))
ATTENTION = ((12, 128, 64), (12, 197, 64), (8, 64, 64), (4, 256, 32), (12, 50, 64))
FULL_ATTENTION = ATTENTION + ((12, 256, 64), (12, 512, 64), (16, 128, 64), (6, 197, 64),
                              (3, 49, 32), (8, 384, 48), (2, 1024, 32))


def _matrix_cases(full: bool) -> Iterator[OpCase]:
    for m, k, n in FULL_GEMMS if full else GEMMS:
        yield OpCase(f"Gemm {m}x{k} . {k}x{n}", "Gemm", ((m, k),), ((n, k), (n,)),
                     {"transB": 1})
        if m > 1:
            yield OpCase(f"MatMul {m}x{k} . {k}x{n}", "MatMul", ((1, m, k),), ((k, n),))
    for heads, seq, dim in FULL_ATTENTION if full else ATTENTION:   # attention: QK^T, PV
        yield OpCase(f"MatMul QK {heads}x{seq}x{dim}", "MatMul",
                     ((1, heads, seq, dim), (1, heads, dim, seq)))
        yield OpCase(f"MatMul PV {heads}x{seq}x{dim}", "MatMul",
                     ((1, heads, seq, seq), (1, heads, seq, dim)))
        yield OpCase(f"Softmax {heads}x{seq}x{seq}", "Softmax", ((1, heads, seq, seq),),
                     attrs={"axis": -1})
    yield OpCase("Softmax 1x1000", "Softmax", ((1, 1000),), attrs={"axis": -1})


# -- memory-bound operators -----------------------------------------------------------------
ELEMENTWISE = ((1, 32, 112, 112), (1, 64, 56, 56), (1, 256, 28, 28), (1, 512, 7, 7),
               (1, 16, 32, 32), (1, 64, 160, 160))     # the last beyond a core's caches
FULL_ELEMENTWISE = ELEMENTWISE + ((1, 96, 112, 112), (1, 144, 56, 56), (1, 128, 28, 28),
                                  (1, 1024, 14, 14), (1, 2048, 7, 7), (1, 8, 8, 8),
                                  (1, 128, 768), (1, 197, 3072))
SEQUENCES = ((128, 768), (197, 768), (50, 512), (256, 256), (16, 384))
FULL_SEQUENCES = SEQUENCES + ((512, 768), (196, 384), (49, 768), (1024, 256), (8, 64))
ACTIVATION_OPSETS = {"Gelu": 20, "HardSwish": 14}


def _activation_cases(full: bool) -> Iterator[OpCase]:
    from wpk.op_features import ACTIVATIONS

    for op, shape in itertools.product(ACTIVATIONS, FULL_ELEMENTWISE if full else ELEMENTWISE):
        attrs = {"alpha": 0.1} if op == "LeakyRelu" else {}
        yield OpCase(f"{op} {_dims(shape)}", op, (shape,), attrs=attrs,
                     opset=ACTIVATION_OPSETS.get(op, OPSET))


def _memory_cases(full: bool) -> Iterator[OpCase]:
    shapes = FULL_ELEMENTWISE if full else ELEMENTWISE
    for shape in shapes:
        yield OpCase(f"Add {_dims(shape)}", "Add", (shape, shape))
        yield OpCase(f"Mul {_dims(shape)}", "Mul", (shape, shape))
        if len(shape) == 4:
            c, s = shape[1], shape[2]
            yield OpCase(f"Add bias {_dims(shape)}", "Add", (shape,), ((1, c, 1, 1),))
            yield OpCase(f"BatchNormalization {_dims(shape)}", "BatchNormalization", (shape,),
                         ((c,), (c,), (c,), (c,)))
            yield OpCase(f"Concat 2x {_dims(shape)}", "Concat", (shape, shape),
                         attrs={"axis": 1})
            yield OpCase(f"Transpose {_dims(shape)}", "Transpose", (shape,),
                         attrs={"perm": [0, 2, 3, 1]})
            yield OpCase(f"GlobalAveragePool {_dims(shape)}", "GlobalAveragePool", (shape,))
            if s >= 14:
                yield OpCase(f"MaxPool k3 s2 {_dims(shape)}", "MaxPool", (shape,),
                             attrs={"kernel_shape": [3, 3], "strides": [2, 2],
                                    "pads": [1, 1, 1, 1]})
                yield OpCase(f"MaxPool k2 s2 {_dims(shape)}", "MaxPool", (shape,),
                             attrs={"kernel_shape": [2, 2], "strides": [2, 2]})
                yield OpCase(f"AveragePool k3 s1 {_dims(shape)}", "AveragePool", (shape,),
                             attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]})
                yield OpCase(f"Resize x2 {_dims(shape)}", "Resize", (shape,),
                             attrs={"mode": "nearest"},
                             constants=(None, ("float32", (1.0, 1.0, 2.0, 2.0))))
                yield OpCase(f"LRN {_dims(shape)}", "LRN", (shape,),
                             attrs={"size": 5, "alpha": 1e-4, "beta": 0.75})


def _norm_cases(full: bool) -> Iterator[OpCase]:
    for seq, dim in FULL_SEQUENCES if full else SEQUENCES:
        yield OpCase(f"LayerNormalization {seq}x{dim}", "LayerNormalization", ((1, seq, dim),),
                     ((dim,), (dim,)), {"axis": -1})
        yield OpCase(f"Add {seq}x{dim}", "Add", ((1, seq, dim), (1, seq, dim)))
        yield OpCase(f"Gelu {seq}x{4 * dim}", "Gelu", ((1, seq, 4 * dim),), opset=20)
        heads = 12 if dim % 12 == 0 else 8
        yield OpCase(f"Transpose heads {seq}x{dim}", "Transpose",
                     ((1, seq, heads, dim // heads),), attrs={"perm": [0, 2, 1, 3]})


def grid(kind: str = "default") -> list[OpCase]:
    """The cases of the `default` or `full` grid, in a fixed order."""
    if kind not in GRIDS:
        raise ValueError(f"unknown grid {kind!r} ({', '.join(GRIDS)})")
    full = kind == "full"
    cases = [*_conv_cases(full), *_matrix_cases(full), *_activation_cases(full),
             *_memory_cases(full), *_norm_cases(full)]
    seen: set[str] = set()
    unique = []
    for case in cases:
        if case.name not in seen:
            seen.add(case.name)
            unique.append(case)
    return unique
