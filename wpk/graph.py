"""`Graph`: a read-only view of an ONNX model after shape inference.

Everything in wpk reads models through this view: nodes in topological order (with the
stable names of `wpk.naming`), every tensor's shape, dtype and byte size, and each node's
FLOPs and bytes touched, which the roofline cost model needs.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, shape_inference

from wpk.errors import WpkError
from wpk.files import existing_file
from wpk.naming import name_nodes
from wpk.shapes import complete_shapes, fold_shape_arithmetic, static_shape
from wpk.subgraphs import node_reads
from wpk.tensor_spec import TensorSpec


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    is_initializer: bool = False

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class NodeInfo:
    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]   # non-empty input names, initializers included
    outputs: tuple[str, ...]  # non-empty output names
    flops: float
    bytes_touched: int        # all inputs (weights too) plus all outputs


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x3x224x224' -> (1, 3, 224, 224)."""
    try:
        dims = tuple(int(part) for part in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise WpkError(f"bad shape {text!r}: expected dimensions like 1x3x224x224") from None
    if not dims or any(d <= 0 for d in dims):
        raise WpkError(f"bad shape {text!r}: dimensions must be positive integers")
    return dims


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """['input=1x3x224x224', ...] -> {'input': (1, 3, 224, 224)}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.partition("=")
        if not sep or not name:
            raise WpkError(f"bad --input-shape {spec!r}: expected NAME=1x3x224x224")
        shapes[name] = parse_shape(dims)
    return shapes


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file, turning every way it can be wrong into a one-line WpkError."""
    path = existing_file(path)
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf raises DecodeError, RuntimeWarning, ...
        # onnx's own words where it has them (a missing external-data file names that file)
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise WpkError(f"{path}: not a readable ONNX model ({type(error).__name__}"
                       f"{': ' + detail if detail else ''})") from None
    if not model.graph.node and not model.graph.output:
        raise WpkError(f"{path}: not an ONNX model (empty or truncated file)")
    without_trailing_empty_inputs(model.graph)
    return model


def without_trailing_empty_inputs(graph: onnx.GraphProto) -> onnx.GraphProto:
    """Drop the empty names that end a node's inputs (in place, subgraphs too). ONNX writes a
    left-out optional input as an empty name, and one at the end means the same as none.
    Why: ONNX Runtime 1.32 dies with a segmentation fault loading a LayerNormalization whose
    bias is given as an empty name (`["x", "scale", ""]`); without it, the model runs."""
    for node in graph.node:
        while len(node.input) and node.input[-1] == "":
            del node.input[-1]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                without_trailing_empty_inputs(attribute.g)
            for subgraph in attribute.graphs:
                without_trailing_empty_inputs(subgraph)
    return graph


def without_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop graph inputs that name an initializer (in place). Files of IR version 3 list every
    weight as an input too; to ONNX Runtime they are then inputs a caller may override, and
    a model cut or rewritten from them asks for them as inputs. wpk treats them as the
    constants they are."""
    weights = {i.name for i in model.graph.initializer}
    if any(v.name in weights for v in model.graph.input):
        kept = [v for v in model.graph.input if v.name not in weights]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = max(model.ir_version, 4)   # IR 4 lets initializers stand alone
    return model


def fixed_shapes(path: str | os.PathLike, shapes: Mapping[str, Sequence[int]],
                 label: str) -> onnx.ModelProto:
    """The model at `path` with the given input shapes fixed."""
    model = load_model(path)
    fix_input_shapes(model, shapes, label)
    return model


def infer_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]],
                  label: str) -> onnx.ModelProto:
    """ONNX shape inference. With shapes the user gave, strict first (one inference either
    way when it passes): shapes that contradict the model (an input of 7 features into a
    Gemm of 2048) fail naming the node, not later as some tensor without a shape; other
    strict failures fall back to the lenient inference."""
    if input_shapes:
        try:
            return shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        except Exception as error:
            _raise_if_mismatch(error, input_shapes, label)
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise WpkError(f"{label}: shape inference failed: {first_line[:200]}") from None


def _raise_if_mismatch(error: Exception, input_shapes: Mapping[str, tuple[int, ...]],
                       label: str) -> None:
    """A strict inference error that is a dimension mismatch, as one line naming the node."""
    text = " ".join(str(error).split())
    if "mismatch" in text.lower() or "incompatible" in text.lower():
        found = re.search(r"\(op_type:(\w+), node name: ([^)]*)\): (?:\[\w+\] )?"
                          r"(.*?)(?= \(op_type:|$)", text)
        where = f"node {found.group(2)} ({found.group(1)}): {found.group(3)}" if found \
            else text
        shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in input_shapes.items())
        raise WpkError(f"{label}: --input-shape {shapes} does not fit the model: "
                       f"{where[:200]}") from None


def _tensor_dtype(elem_type: int) -> np.dtype:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        raise WpkError(f"unsupported tensor element type {elem_type}") from None


def _known_tensors(graph: onnx.GraphProto) -> dict[str, TensorInfo]:
    """The initializers, and the inputs, value_info and outputs with a static shape."""
    tensors: dict[str, TensorInfo] = {}
    for init in graph.initializer:
        tensors[init.name] = TensorInfo(
            init.name, tuple(int(d) for d in init.dims), _tensor_dtype(init.data_type), True)
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.name not in tensors and static_shape(value) is not None:
            tensors[value.name] = TensorInfo(
                value.name, static_shape(value),
                _tensor_dtype(value.type.tensor_type.elem_type))
    return tensors


class Graph:
    """A shape-inferred ONNX model with per-node costs. Build it with `Graph.load`."""

    def __init__(self, model: onnx.ModelProto, name: str, sha256: str | None = None,
                 path: Path | None = None):
        self.model = model
        self.name = name
        self.sha256 = sha256
        self.path = path
        graph = model.graph
        initializer_names = {init.name for init in graph.initializer}
        self.tensors: dict[str, TensorInfo] = _known_tensors(graph)
        self.inputs: list[str] = [v.name for v in graph.input if v.name not in initializer_names]
        self.outputs: list[str] = [v.name for v in graph.output]
        self.initializers: frozenset[str] = frozenset(initializer_names)
        self.nodes: list[NodeInfo] = self._node_infos(graph, initializer_names)
        self.node_index: dict[str, int] = {n.name: n.index for n in self.nodes}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for node in self.nodes:
            for tensor in node.outputs:
                self.producer[tensor] = node.index
            for tensor in dict.fromkeys(node.inputs):
                self.consumers.setdefault(tensor, []).append(node.index)
        self._check_outputs()

    def _node_infos(self, graph: onnx.GraphProto, initializer_names: set[str]
                    ) -> list[NodeInfo]:
        """The nodes in topological order, with what they read and write, and their costs."""
        nodes = _topological_order(list(graph.node), set(self.inputs) | initializer_names)
        self._protos = nodes
        infos: list[NodeInfo] = []
        reads = [node_reads(node) for node in nodes]   # subgraphs walked once per node
        read = {t for node_inputs in reads for t in node_inputs} | {v.name for v in graph.output}
        for index, (node, ins) in enumerate(zip(nodes, reads)):
            # an output that nothing reads (a Dropout's mask) is never sent: it needs no shape
            outs = tuple(n for n in node.output if n and n in read)
            for tensor in ins + outs:
                if tensor not in self.tensors:
                    raise WpkError(f"{self.name}: tensor {tensor!r} (node {node.name}) has no "
                                   "known shape")
            infos.append(NodeInfo(
                index, node.name, node.op_type, ins, outs,
                node_flops(node, self.tensors),
                sum(self.tensors[t].nbytes for t in ins + outs)))
        return infos

    def _check_outputs(self) -> None:
        """Every graph output is computed by a node (or is an input) and has a shape."""
        for output in self.outputs:
            if output not in self.producer and output not in self.inputs:
                raise WpkError(f"{self.name}: output {output!r} is computed by no node (a "
                               "constant or a dangling name); wpk can only plan computed "
                               "outputs")
            if output not in self.tensors:
                raise WpkError(f"{self.name}: output {output!r} is not a tensor with a known "
                               "shape")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | os.PathLike | onnx.ModelProto,
             input_shapes: Mapping[str, Sequence[int]] | None = None,
             name: str | None = None) -> "Graph":
        """Load a model (path or ModelProto), fix input shapes, infer shapes, name nodes."""
        if isinstance(source, onnx.ModelProto):
            model, path, sha = onnx.ModelProto(), None, None
            model.CopyFrom(source)
            label = name or model.graph.name or "model"
        else:
            path = Path(source)
            model = load_model(path)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            label = name or path.stem
        without_trailing_empty_inputs(model.graph)
        name_nodes(model)
        if input_shapes:
            fix_input_shapes(model, input_shapes, label)
        model = fold_shape_arithmetic(complete_shapes(infer_shapes(model, input_shapes, label),
                                                      label))
        return cls(model, label, sha, path)

    # -- queries ------------------------------------------------------------------------
    def tensor_bytes(self, name: str) -> int:
        return self.tensors[name].nbytes

    def tensor_spec(self, name: str) -> TensorSpec:
        """The tensor as plans and tiers describe it: name, shape, numpy dtype name."""
        info = self.tensors[name]
        return TensorSpec.of(name, info.shape, info.dtype)

    def node(self, name: str) -> NodeInfo:
        try:
            return self.nodes[self.node_index[name]]
        except KeyError:
            raise WpkError(f"{self.name}: no node named {name!r}") from None

    def attribute(self, node: NodeInfo, name: str, default=None):
        """The value of one of the node's ONNX attributes, or `default`."""
        return _attr(self._protos[node.index], name, default)

    def input_slots(self, node: NodeInfo) -> list[str]:
        """The node's inputs by position, skipped optional ones as "" (`inputs` drops
        them)."""
        return list(self._protos[node.index].input)

    @property
    def total_flops(self) -> float:
        return float(sum(n.flops for n in self.nodes))

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self.nodes)} nodes, {self.total_flops / 1e9:.2f} GFLOP)"


def fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]],
                     label: str) -> None:
    """Set the given inputs' shapes (in place), dropping inferred shapes they would contradict."""
    inputs = {v.name: v for v in model.graph.input}
    for tensor, dims in shapes.items():
        if tensor not in inputs:
            raise WpkError(f"{label}: --input-shape names {tensor!r}, which is not an input "
                           f"(inputs: {', '.join(inputs)})")
        shape = inputs[tensor].type.tensor_type.shape
        if len(shape.dim) and len(shape.dim) != len(dims):
            raise WpkError(f"{label}: input {tensor!r} has rank {len(shape.dim)}, "
                           f"--input-shape gives {len(dims)} dimensions")
        del shape.dim[:]
        for d in dims:
            shape.dim.add().dim_value = int(d)
    # Stale inferred shapes would contradict the new input shapes.
    del model.graph.value_info[:]
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")


def _topological_order(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in a topological order (the file's own order when it already is one)."""
    produced_by = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    reads = [node_reads(n) for n in nodes]
    seen: set[str] = set(available)
    in_order = True
    for node, node_inputs in zip(nodes, reads):
        if any(i not in seen and i in produced_by for i in node_inputs):
            in_order = False
            break
        seen.update(o for o in node.output if o)
    if in_order:
        return nodes
    pending = [sum(1 for i in set(r) if i in produced_by) for r in reads]
    users: dict[int, list[int]] = {}
    for j, node_inputs in enumerate(reads):
        for i in set(node_inputs):
            if i in produced_by:
                users.setdefault(produced_by[i], []).append(j)
    ready = [j for j, p in enumerate(pending) if p == 0]
    order: list[int] = []
    while ready:
        j = ready.pop(0)
        order.append(j)
        for k in users.get(j, []):
            pending[k] -= 1
            if pending[k] == 0:
                ready.append(k)
    if len(order) != len(nodes):
        raise WpkError("the model's graph has a cycle")
    return [nodes[j] for j in order]




def conv_weight_index(op_type: str) -> int:
    """Position of the weight among a convolution's inputs (QLinearConv puts x's scale and
    zero point first)."""
    return 3 if op_type == "QLinearConv" else 1


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


_ELEMENTWISE_COST = {"Sigmoid": 4, "Tanh": 4, "Erf": 4, "Gelu": 8, "Softmax": 5, "Exp": 4,
                     "HardSwish": 3, "HardSigmoid": 3, "LayerNormalization": 8,
                     "BatchNormalization": 2, "InstanceNormalization": 5}


def node_flops(node: onnx.NodeProto, tensors: Mapping[str, TensorInfo]) -> float:
    """Floating-point operations of one node (multiply-add = 2)."""
    outs = [tensors[o] for o in node.output if o in tensors]
    ins = [tensors[i] for i in node.input if i in tensors]
    out_numel = sum(t.numel for t in outs)
    op = node.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv") and len(ins) >= 2:
        weight = ins[conv_weight_index(op)]
        per_output = math.prod(weight.shape[1:])  # Cin/group * kh * kw
        return 2.0 * outs[0].numel * per_output
    if op == "ConvTranspose" and len(ins) >= 2:
        return 2.0 * ins[0].numel * math.prod(ins[1].shape[1:])
    if op == "Gemm" and len(ins) >= 2:
        a = ins[0].shape
        k = a[0] if _attr(node, "transA", 0) else a[-1]
        return 2.0 * outs[0].numel * k
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul") and ins:
        k = ins[0].shape[-1] if ins[0].shape else 1
        return 2.0 * outs[0].numel * k
    if op in ("MaxPool", "AveragePool", "LpPool"):
        return float(out_numel * math.prod(_attr(node, "kernel_shape", [1])))
    if op.startswith("Global") or op.startswith("Reduce"):
        return float(ins[0].numel if ins else out_numel)
    return float(out_numel * _ELEMENTWISE_COST.get(op, 1))
