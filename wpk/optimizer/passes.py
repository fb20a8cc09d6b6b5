"""Graph passes over ONNX models: shape and constant folding, Conv+BatchNorm folding, attention
fusion, Conv+Relu fusion, dead-node removal, and ONNX Runtime's own offline optimization saved
to a file.

Every pass takes and returns an `onnx.ModelProto` (a new one; the input is not modified) and
keeps the model's outputs bit-for-bit or within float rounding.
"""
from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from wpk.subgraphs import node_reads

FOLDABLE_SKIP = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                 "Multinomial", "If", "Loop", "Scan"}


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _consumers(model: onnx.ModelProto) -> Counter:
    count: Counter = Counter()
    for node in model.graph.node:
        for name in node_reads(node):
            count[name] += 1
    for out in model.graph.output:
        count[out.name] += 1
    return count


def _rebuild(model: onnx.ModelProto, nodes: list[onnx.NodeProto],
             initializers: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {name for node in nodes for name in node_reads(node)} | \
        {o.name for o in out.graph.output}
    del out.graph.initializer[:]
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(value), name)
                                 for name, value in initializers.items() if name in used)
    graph_inputs = [i for i in out.graph.input if i.name not in initializers or i.name in used]
    del out.graph.input[:]
    out.graph.input.extend(graph_inputs)
    return out


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate nodes whose inputs are all constants (initializers or Constant nodes)."""
    from onnx.reference import ReferenceEvaluator

    consts = _initializers(model)
    graph_inputs = {i.name for i in model.graph.input} - set(consts)
    kept = []
    for node in model.graph.node:
        inputs = [n for n in node.input if n]
        if node.op_type not in FOLDABLE_SKIP and node.domain in ("", "ai.onnx") and \
                all(n in consts and n not in graph_inputs for n in inputs) and \
                node.op_type != "Identity" or (node.op_type == "Constant"):
            try:
                single = helper.make_graph(
                    [node], "fold", [], [helper.make_tensor_value_info(o, 0, None)
                                         for o in node.output],
                    [numpy_helper.from_array(consts[n], n) for n in inputs])
                single_model = helper.make_model(single, opset_imports=model.opset_import)
                values = ReferenceEvaluator(single_model).run(None, {})
                for name, value in zip(node.output, values):
                    consts[name] = np.asarray(value)
                continue
            except Exception:
                pass  # leave what the reference evaluator cannot run to ONNX Runtime
        kept.append(node)
    return _rebuild(model, kept, consts)


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv (constant weights) -> BatchNormalization (constant stats) becomes one Conv."""
    consts = _initializers(model)
    consumers = _consumers(model)
    producer = {o: node for node in model.graph.node for o in node.output}
    drop: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    for bn in model.graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or consumers[conv.output[0]] != 1:
            continue
        names = list(bn.input[1:5])
        if not all(n in consts for n in names) or conv.input[1] not in consts:
            continue
        scale, shift, mean, var = (consts[n].astype(np.float64) for n in names)
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = scale / np.sqrt(var + eps)
        weight = consts[conv.input[1]].astype(np.float64)
        bias = consts[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and \
            conv.input[2] else np.zeros(weight.shape[0])
        w_name, b_name = conv.input[1] + "_bnfold", bn.output[0] + "_bias"
        consts[w_name] = (weight * factor[:, None, None, None]).astype(np.float32)
        consts[b_name] = ((bias - mean) * factor + shift).astype(np.float32)
        fused = helper.make_node("Conv", [conv.input[0], w_name, b_name], [bn.output[0]],
                                 name=conv.name, domain=conv.domain)
        fused.attribute.extend(conv.attribute)
        replace[id(conv)] = fused
        drop.add(id(bn))
    nodes = [replace.get(id(n), n) for n in model.graph.node if id(n) not in drop]
    return _rebuild(model, nodes, consts)


def fuse_conv_relu(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv -> Relu becomes ONNX Runtime's contrib `FusedConv` (activation Relu). Only useful
    below ORT_ENABLE_ALL, which does the same fusion itself."""
    consumers = _consumers(model)
    producer = {o: node for node in model.graph.node for o in node.output}
    drop, replace = set(), {}
    for relu in model.graph.node:
        if relu.op_type != "Relu":
            continue
        conv = producer.get(relu.input[0])
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or \
                consumers[conv.output[0]] != 1:
            continue
        fused = helper.make_node("FusedConv", list(conv.input), [relu.output[0]],
                                 name=conv.name, domain="com.microsoft", activation="Relu")
        fused.attribute.extend(a for a in conv.attribute)
        replace[id(conv)] = fused
        drop.add(id(relu))
    nodes = [replace.get(id(n), n) for n in model.graph.node if id(n) not in drop]
    out = _rebuild(model, nodes, _initializers(model))
    if replace and not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def remove_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes (and Identity/Dropout pass-throughs) whose outputs reach no graph output."""
    needed = {o.name for o in model.graph.output}
    # names a subgraph reads from this scope cannot be renamed by rewriting node inputs
    read_by_subgraphs = {name for node in model.graph.node
                         for name in set(node_reads(node)) - set(node.input)}
    alias: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("Identity", "Dropout") and node.output[0] not in needed and \
                node.output[0] not in read_by_subgraphs and \
                len([o for o in node.output if o]) == 1:
            alias[node.output[0]] = node.input[0]
    kept = []
    for node in reversed(model.graph.node):
        if node.output[0] in alias:
            continue
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node_reads(node))
    nodes = []
    for node in reversed(kept):
        node = copy.deepcopy(node)
        for i, name in enumerate(node.input):
            while name in alias:
                name = alias[name]
            node.input[i] = name
        nodes.append(node)
    return _rebuild(model, nodes, _initializers(model))


def fold_shapes(model: onnx.ModelProto, rounds: int = 8) -> onnx.ModelProto:
    """Shape arithmetic as constants, where the inputs' shapes are static: each round of
    shape inference knows more shapes once the last round's Reshape targets are constants
    (a torch export of BERT needs four). Exporters' attention blocks are matched on the
    result (`attention.py`)."""
    from onnx import shape_inference

    from wpk.shapes import fold_shape_arithmetic

    for _ in range(rounds):
        before = len(model.graph.node)
        try:
            model = fold_shape_arithmetic(shape_inference.infer_shapes(model))
        except Exception:   # an operator shape inference does not know: as far as it got
            break
        if len(model.graph.node) == before:
            break
    return model


def fuse_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    from wpk.optimizer.attention import fuse_attention as fuse

    return fuse(model)


def run_passes(model: onnx.ModelProto, conv_relu: bool = False) -> tuple[onnx.ModelProto,
                                                                        list[str]]:
    """The default pipeline; returns the new model and a line per pass that changed it."""
    log = []
    for name, fn in [("fold-shapes", fold_shapes), ("fold-constants", fold_constants),
                     ("fold-batchnorm", fold_batchnorm), ("fuse-attention", fuse_attention),
                     ("remove-dead-nodes", remove_dead_nodes)] + \
            ([("fuse-conv-relu", fuse_conv_relu)] if conv_relu else []):
        before = len(model.graph.node)
        model = fn(model)
        if len(model.graph.node) != before:
            log.append(f"{name}: {before} -> {len(model.graph.node)} nodes")
    return model, log


def ort_offline_optimize(model_path: str | Path, out_path: str | Path, level: str = "all",
                         threads: int = 0) -> Path:
    """Let ONNX Runtime optimize the model for *this* machine and save the result (at level
    'all' the saved graph holds hardware-specific layouts such as NCHWc: it belongs to one
    tier and is what the tier loads, with optimizations then disabled)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(out_path)
    options.log_severity_level = 3  # the NCHWc "hardware specific" warning is the point here
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return Path(out_path)


def _levels():
    import onnxruntime as ort

    g = ort.GraphOptimizationLevel
    return {"disabled": g.ORT_DISABLE_ALL, "basic": g.ORT_ENABLE_BASIC,
            "extended": g.ORT_ENABLE_EXTENDED, "all": g.ORT_ENABLE_ALL}


class _Levels(dict):
    def __missing__(self, key):
        self.update(_levels())
        return dict.__getitem__(self, key)


LEVELS = _Levels()
