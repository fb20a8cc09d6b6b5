"""Static shapes for every tensor that can cross a cut, and the shape arithmetic that fixed
input shapes make constant.

ONNX's shape inference runs first (wpk.graph); this module fills what it leaves open with one
ONNX Runtime run, and folds computations on shapes (Shape -> Gather -> Concat -> Reshape, as
exporters write for a symbolic batch) into constants, so that a cut never sends a batch size
across a link, and a tier never needs one from its peer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from wpk.errors import WpkError
from wpk.subgraphs import node_reads


def static_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """The tensor's shape when every dimension is a known positive number, else None. A 0
    from shape inference is as likely its mistake (a Reshape's "copy this dimension" taken
    literally) as an empty tensor: such tensors are measured."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    dims = value.type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
        return None
    return tuple(int(d.dim_value) for d in dims)


def complete_shapes(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """Give every tensor that can cross a cut a static shape.

    ONNX's shape inference leaves some unknown (operators it cannot follow, shapes computed
    from data); those come from one real run of ONNX Runtime at the fixed input shapes, and
    are written into the model's value_info. A shape that depends on the input's values
    (NonZero) is then the one these random inputs gave. Outputs that nothing reads need no
    shape and are not measured.
    """
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    for value in inputs:
        if static_shape(value) is None:
            raise WpkError(_dynamic_input_message(value, label))
    missing = _unshaped_tensors(graph, initializers)
    if not missing:
        return model
    _write_shapes(graph, _measured_shapes(model, inputs, missing, label))
    return model


def _dynamic_input_message(value: onnx.ValueInfoProto, label: str) -> str:
    """What to tell a user whose model input has no static shape: the flag that fixes it."""
    dims = value.type.tensor_type.shape.dim
    dynamic = [repr(d.dim_param or "?") for d in dims if not d.HasField("dim_value")]
    what = (f"a dynamic dimension {dynamic[0]}" if len(dynamic) == 1
            else f"dynamic dimensions {', '.join(dynamic)}" if dynamic else "no shape")
    example = "x".join(str(d.dim_value) if d.HasField("dim_value") else "N"
                       for d in dims) or "N"
    return (f"{label}: input {value.name!r} has {what}; fix it with "
            f"--input-shape {value.name}={example}, each N a number")


def _unshaped_tensors(graph: onnx.GraphProto, initializers: set[str]) -> list[str]:
    """The tensors something reads (or the graph outputs) that have no static shape yet,
    in graph order."""
    known = {v.name: v for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    reads = [node_reads(node) for node in graph.node]   # subgraphs walked once per node
    read = {t for node_inputs in reads for t in node_inputs} | {v.name for v in graph.output}
    missing = [t for node, node_inputs in zip(graph.node, reads)
               for t in list(node_inputs) + list(node.output)
               if t and t in read and t not in initializers
               and (t not in known or static_shape(known[t]) is None)]
    return list(dict.fromkeys(missing))


def measure_shapes(model: onnx.ModelProto, names: Sequence[str], label: str
                   ) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` from one ONNX Runtime run of `model` (static input shapes) on random
    inputs; a WpkError in one line when it cannot run."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    return {name: shape for name, (shape, _dtype) in
            _measured_shapes(model, inputs, names, label).items()}


def _write_shapes(graph: onnx.GraphProto,
                  measured: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """The measured shapes into the graph: its outputs', or value_info (replacing any)."""
    kept = [v for v in graph.value_info if v.name not in measured]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for name, (shape, dtype) in measured.items():
        typed = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype),
                                              list(shape))
        outputs = [v for v in graph.output if v.name == name]
        if outputs:
            outputs[0].CopyFrom(typed)
        else:
            graph.value_info.append(typed)


def _measured_shapes(model: onnx.ModelProto, inputs: Sequence[onnx.ValueInfoProto],
                     names: Sequence[str], label: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of `names` from one ONNX Runtime run on random inputs."""
    import onnxruntime as ort

    from wpk.errors import ort_error_line
    from wpk.feeds import random_feeds

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {v.name for v in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    options = ort.SessionOptions()
    options.log_severity_level = 4   # a failed run is reported below, in one line
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feeds = random_feeds({v.name: (static_shape(v),
                                   helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
                          for v in inputs}, seed=0)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        arrays = session.run(list(names), feeds)
    except Exception as error:  # ORT's own exception types
        raise WpkError(f"{label}: ONNX shape inference leaves tensor {names[0]!r} without a "
                       "static shape, and ONNX Runtime could not run the model on random "
                       f"inputs to measure it: {ort_error_line(error)}") from None
    shapes = {}
    for name, array in zip(names, arrays):
        array = np.asarray(array)
        if array.dtype.kind not in "biuf":
            raise WpkError(f"{label}: tensor {name!r} holds {array.dtype.name} values, which "
                           "wpk cannot price or send; it plans numeric tensors only")
        shapes[name] = (tuple(int(d) for d in array.shape), array.dtype)
    return shapes



# The arithmetic exporters write on shapes; once its inputs are constant, so is its result.
SHAPE_OPS = frozenset({
    "Shape", "Size", "Constant", "Identity", "Cast", "Gather", "Concat", "Unsqueeze",
    "Squeeze", "Slice", "Reshape", "Range", "ConstantOfShape", "Expand", "ReduceProd",
    "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Max", "Min", "Floor", "Ceil",
    "Equal", "Greater", "Less", "Not", "And", "Or", "Where"})
MAX_FOLDED_ELEMENTS = 64    # shapes and indices; never a weight or an activation


def fold_shape_arithmetic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace shape arithmetic by initializers (in place), once input shapes are fixed.

    A `Shape` of a tensor whose shape is static is a constant, and so is every small result
    computed from constants alone. Left in the graph, such a value (an exported model's
    batch size) can cross a cut: the next tier then needs it from its peer, and a warm-up on
    zeros gives it a batch of 0. Graph outputs are kept as they are.
    """
    graph = model.graph
    shapes = {v.name: static_shape(v)
              for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer
                 if int(np.prod(i.dims)) <= MAX_FOLDED_ELEMENTS}
    outputs = {v.name for v in graph.output}
    opsets = list(model.opset_import)
    folded: dict[str, np.ndarray] = {}
    kept = []
    for node in graph.node:
        values = None
        if node.op_type in SHAPE_OPS and node.domain in ("", "ai.onnx") and \
                not set(node.output) & outputs and \
                not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for a in node.attribute):
            values = _constant_outputs(node, shapes, constants, opsets)
        if values is None or any(v.size > MAX_FOLDED_ELEMENTS for v in values):
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            constants[name] = folded[name] = value
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items())
        stale = [v for v in graph.value_info if v.name in folded]
        for value in stale:
            graph.value_info.remove(value)
    return model


def _constant_outputs(node: onnx.NodeProto, shapes: dict, constants: dict,
                      opsets: list) -> list[np.ndarray] | None:
    """The node's outputs when they follow from static shapes and constants, else None."""
    if node.op_type in ("Shape", "Size"):
        shape = shapes.get(node.input[0])
        if shape is None:
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape)), dtype=np.int64)]
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        start, end = attributes.get("start", 0), attributes.get("end", None)
        return [np.array(shape, dtype=np.int64)[start:end]]
    inputs = [name for name in node.input if name]
    if not all(name in constants for name in inputs):
        return None
    from onnx.reference import ReferenceEvaluator

    single = helper.make_graph(
        [node], "fold", [], [helper.make_tensor_value_info(o, 0, None) for o in node.output],
        [numpy_helper.from_array(np.asarray(constants[name]), name)
         for name in dict.fromkeys(inputs)])
    try:
        values = ReferenceEvaluator(helper.make_model(single, opset_imports=opsets)).run(None, {})
    except Exception:  # an operator or attribute the reference cannot follow: keep the node
        return None
    return [np.asarray(v) for v in values]
