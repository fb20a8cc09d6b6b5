"""Scaled dot-product attention, as exporters write it, fused into ONNX Runtime's
`com.microsoft.MultiHeadAttention` (one operator per attention block: the heads' split and
merge, the score matrix, the mask and the softmax never leave it).

ONNX Runtime's own transformer fusions (`onnxruntime.transformers`) do not match what torch's
TorchScript exporter writes for `scaled_dot_product_attention` (transformers' default
attention): the scale is split in two (`Q * s` and `K * s`, s = head_size ** -0.25), the keys
are transposed in one step to [B, N, H, L], and the softmax is followed by a NaN guard
(`Where(IsNaN(P), 0, P)`, for rows whose every key is masked with -inf). That is the
pattern matched here, and the plain one (one scale or none, no guard):

    Q = Transpose[0,2,1,3](Reshape(q))            q, k, v: [B, S, N*H] (or [B, L, N*H])
    K = Transpose[0,2,3,1](Reshape(k))            (or Transpose[0,2,1,3] then [0,1,3,2])
    V = Transpose[0,2,1,3](Reshape(v))
    P = Softmax(MatMul(Q * sq, K * sk) [+ bias])  bias: [B or 1, N or 1, S, L]
    out = Reshape(Transpose[0,2,1,3](MatMul(P [guarded], V)))

The guard is kept after the fused operator (a row of NaN becomes a row of zeros, as P's
zeros made it), so outputs stay those of the original within float rounding. Shapes must be
static (`wpk-optimize` fixes the inputs' shapes first).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

MS_DOMAIN = "com.microsoft"


@dataclass
class _Graph:
    """Producers, readers, constants and static shapes of one model, for matching."""

    producer: dict[str, onnx.NodeProto]
    readers: dict[str, list[onnx.NodeProto]]
    constants: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    outputs: set[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "_Graph":
        try:
            inferred = shape_inference.infer_shapes(model)
        except Exception:
            inferred = model
        shapes = {}
        for value in list(inferred.graph.input) + list(inferred.graph.value_info) + \
                list(inferred.graph.output):
            dims = value.type.tensor_type.shape.dim
            if dims and all(d.HasField("dim_value") for d in dims):
                shapes[value.name] = tuple(d.dim_value for d in dims)
        constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        producer, readers = {}, {}
        for node in model.graph.node:
            for name in node.output:
                producer[name] = node
            for name in node.input:
                readers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.attribute and \
                    node.attribute[0].name == "value":
                constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        return cls(producer, readers, constants, shapes, {o.name for o in model.graph.output})

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and \
            node.domain in ("", "ai.onnx") else None

    def only_reader(self, name: str) -> onnx.NodeProto | None:
        found = self.readers.get(name, [])
        return found[0] if len(found) == 1 and name not in self.outputs else None

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


@dataclass
class _Match:
    nodes: list[onnx.NodeProto]       # every node the fused operator replaces
    query: str
    key: str
    value: str
    bias: str                         # "" when there is no additive mask
    output: str
    heads: int
    scale: float
    guarded: bool
    packed: "_Packed | None" = None   # the three projections, where they can be one GEMM


def _scaled(g: _Graph, name: str, nodes: list) -> tuple[str, float]:
    """`name` without a scalar Mul (or Div) in front of it, and that scale."""
    node = g.producer.get(name)
    if node is not None and node.op_type in ("Mul", "Div") and g.only_reader(name):
        for i, j in ((0, 1), (1, 0)):
            factor = g.scalar(node.input[j])
            if factor is not None and (node.op_type == "Mul" or j == 1):
                nodes.append(node)
                return node.input[i], factor if node.op_type == "Mul" else 1.0 / factor
    return name, 1.0


def _scores_and_bias(g: _Graph, name: str, shape: tuple[int, ...], nodes: list
                     ) -> tuple[str, str] | None:
    """The softmax's input split into (scores, additive mask): the mask ("" where there is
    none) must broadcast to [B, N, S, L] over its first two dimensions only."""
    add = g.made_by(name, "Add")
    if add is None or not g.only_reader(name):
        return name, ""
    which = next((i for i in (0, 1) if _product(g, add.input[i], [])), None)
    if which is None:
        return None
    batch, heads, length_q, length_k = shape
    bias = add.input[1 - which]
    bias_shape = g.shapes.get(bias)
    if bias_shape is None or len(bias_shape) != 4 or bias_shape[0] not in (1, batch) or \
            bias_shape[1] not in (1, heads) or bias_shape[2:] != (length_q, length_k):
        return None
    nodes.append(add)
    return add.input[which], bias


def _product(g: _Graph, name: str, nodes: list) -> tuple[onnx.NodeProto, float] | None:
    """The MatMul(Q, K) that makes the scores `name`, and the scalar they are scaled by after
    it (transformers' "eager" attention: `MatMul(Q, K) * s`)."""
    scores, scale = _scaled(g, name, nodes)
    product = g.made_by(scores, "MatMul")
    if product is None or g.only_reader(scores) is None:
        return None
    nodes.append(product)
    return product, scale


def _heads_input(g: _Graph, name: str, perms: tuple[list[int], ...], nodes: list) -> str | None:
    """The [B, S, N*H] tensor that Reshape + Transpose(s) split into heads, else None."""
    chain = []
    for perm in reversed(perms):
        node = g.made_by(name, "Transpose")
        if node is None or _perm(node) != perm or g.only_reader(name) is None:
            return None
        chain.append(node)
        name = node.input[0]
    reshape = g.made_by(name, "Reshape")
    if reshape is None or g.only_reader(name) is None:
        return None
    nodes += chain + [reshape]
    return reshape.input[0]


def _after_softmax(g: _Graph, softmax: onnx.NodeProto, nodes: list
                   ) -> tuple[onnx.NodeProto, bool] | None:
    """The MatMul(P, V) that reads the softmax (through a NaN guard or not)."""
    probabilities = softmax.output[0]
    readers = g.readers.get(probabilities, [])
    if len(readers) == 1 and readers[0].op_type == "MatMul":
        return readers[0], False
    if len(readers) != 2 or probabilities in g.outputs:
        return None
    is_nan = next((r for r in readers if r.op_type == "IsNaN"), None)
    where = next((r for r in readers if r.op_type == "Where"), None)
    if is_nan is None or where is None or list(where.input) != \
            [is_nan.output[0], where.input[1], probabilities] or g.scalar(where.input[1]) != 0.0:
        return None
    matmul = g.only_reader(where.output[0])
    if matmul is None or matmul.op_type != "MatMul" or matmul.input[0] != where.output[0]:
        return None
    nodes += [is_nan, where]
    return matmul, True


def _match(g: _Graph, softmax: onnx.NodeProto) -> _Match | None:
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    scores_shape = g.shapes.get(softmax.input[0])
    if scores_shape is None or len(scores_shape) != 4 or axis not in (-1, 3):
        return None
    batch, heads, length_q, length_k = scores_shape
    nodes: list[onnx.NodeProto] = [softmax]
    scored = _scores_and_bias(g, softmax.input[0], scores_shape, nodes)
    found_product = _product(g, scored[0], nodes) if scored else None
    if found_product is None:
        return None
    bias = scored[1]
    product, scale = found_product
    q_heads, scale_q = _scaled(g, product.input[0], nodes)
    k_heads, scale_k = _scaled(g, product.input[1], nodes)
    query = _heads_input(g, q_heads, ([0, 2, 1, 3],), nodes)
    key = _heads_input(g, k_heads, ([0, 2, 3, 1],), nodes) or \
        _heads_input(g, k_heads, ([0, 2, 1, 3], [0, 1, 3, 2]), nodes)
    found = _after_softmax(g, softmax, nodes)
    if query is None or key is None or found is None:
        return None
    weighted, guarded = found
    nodes.append(weighted)
    value = _heads_input(g, weighted.input[1], ([0, 2, 1, 3],), nodes)
    output = _merged_heads(g, weighted.output[0], nodes)
    if value is None or output is None:
        return None
    head_size = g.shapes.get(q_heads, (0, 0, 0, 0))[3]
    expected = {query: (batch, length_q, heads * head_size),
                key: (batch, length_k, heads * head_size),
                value: (batch, length_k, heads * head_size),
                output: (batch, length_q, heads * head_size)}
    if head_size == 0 or any(g.shapes.get(name) != shape for name, shape in expected.items()):
        return None
    return _Match(nodes, query, key, value, bias, output, heads, scale * scale_q * scale_k,
                  guarded)


def _merged_heads(g: _Graph, name: str, nodes: list) -> str | None:
    """The [B, S, N*H] output of Transpose[0,2,1,3] + Reshape after MatMul(P, V) (a Reshape
    to the same shape before them, as torch writes it, is allowed)."""
    node = g.only_reader(name)
    if node is not None and node.op_type == "Reshape" and \
            g.shapes.get(node.output[0]) == g.shapes.get(name):
        nodes.append(node)
        name = node.output[0]
        node = g.only_reader(name)
    if node is None or node.op_type != "Transpose" or _perm(node) != [0, 2, 1, 3]:
        return None
    reshape = g.only_reader(node.output[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    nodes += [node, reshape]
    return reshape.output[0]


@dataclass
class _Packed:
    """Self-attention's three projections (MatMul by a constant, plus a constant bias) of
    one input, as one [D, 3D] weight and [3D] bias for ONNX Runtime's `Attention` (one GEMM
    in place of three)."""

    input: str
    weights: np.ndarray
    bias: np.ndarray
    nodes: list[onnx.NodeProto]


def _projection(g: _Graph, name: str
                ) -> tuple[str, np.ndarray, np.ndarray, list[onnx.NodeProto]] | None:
    """`name` = Add(MatMul(x, W), b) with W and b constants and nothing else reading the
    MatMul or the Add: (x, W, b, those two nodes)."""
    add = g.made_by(name, "Add")
    if add is None or len(g.readers.get(name, [])) != 1 or name in g.outputs:
        return None
    for i in (0, 1):
        bias, product = g.constants.get(add.input[1 - i]), g.made_by(add.input[i], "MatMul")
        if bias is None or product is None or g.only_reader(add.input[i]) is None:
            continue
        weights = g.constants.get(product.input[1])
        if weights is not None and weights.ndim == 2 and bias.shape == weights.shape[1:] and \
                weights.dtype == bias.dtype == np.float32:
            return product.input[0], weights, bias, [product, add]
    return None


def _packed(g: _Graph, match: _Match) -> _Packed | None:
    parts = [_projection(g, name) for name in (match.query, match.key, match.value)]
    if any(p is None for p in parts) or len({p[0] for p in parts}) != 1:
        return None
    return _Packed(parts[0][0], np.concatenate([p[1] for p in parts], axis=1),
                   np.concatenate([p[2] for p in parts]), [n for p in parts for n in p[3]])


def fuse_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every matched attention block as one `Attention` node (self-attention
    whose projections can be packed) or `MultiHeadAttention` node (a new model; unchanged
    when nothing matches)."""
    g = _Graph.of(model)
    matches, taken = [], set()
    for node in model.graph.node:
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
            continue
        match = _match(g, node)
        if match is None or {id(n) for n in match.nodes} & taken:
            continue
        packed = _packed(g, match)
        if packed is not None and not {id(n) for n in packed.nodes} & taken:
            match.nodes += packed.nodes
            match.packed = packed
        matches.append(match)
        taken |= {id(n) for n in match.nodes}
    if not matches:
        return model
    out = copy.deepcopy(model)
    order = {id(node): i for i, node in enumerate(model.graph.node)}
    # each block where its last node was: every tensor it reads exists by then
    fused_at = {max((id(n) for n in m.nodes), key=order.__getitem__): m for m in matches}
    nodes = []
    for node in model.graph.node:
        if id(node) in fused_at:
            nodes += _fused_nodes(fused_at[id(node)], len(nodes), out.graph)
        elif id(node) not in taken:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out


def _fused_nodes(match: _Match, index: int, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    name = f"wpk_attention_{index}"
    raw = f"{name}_out" if match.guarded else match.output
    if match.packed is not None:
        graph.initializer.extend([numpy_helper.from_array(match.packed.weights, f"{name}_W"),
                                  numpy_helper.from_array(match.packed.bias, f"{name}_B")])
        fused = helper.make_node(
            "Attention", [match.packed.input, f"{name}_W", f"{name}_B", "", "", match.bias],
            [raw], name=name, domain=MS_DOMAIN, num_heads=match.heads, scale=match.scale)
    else:
        fused = helper.make_node(
            "MultiHeadAttention", [match.query, match.key, match.value, "", "", match.bias],
            [raw], name=name, domain=MS_DOMAIN, num_heads=match.heads, scale=match.scale)
    if not match.guarded:
        return [fused]
    zero = helper.make_node("Constant", [], [f"{name}_zero"], name=f"{name}_zero",
                            value=numpy_helper.from_array(np.zeros((), np.float32)))
    is_nan = helper.make_node("IsNaN", [raw], [f"{name}_nan"], name=f"{name}_isnan")
    where = helper.make_node("Where", [f"{name}_nan", f"{name}_zero", raw], [match.output],
                             name=f"{name}_guard")
    return [fused, zero, is_nan, where]
