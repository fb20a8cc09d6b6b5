"""Sites for the transformer kernels in ONNX Runtime's saved graph: layer normalizations
(`layer_norm.py`), NaN guards (`nan_guard.py`) and attention (`attention_kernel.py`), as
KernelSpecs that `ort_ops` compiles and puts in place of the nodes they replace.

What qualifies: float32 tensors of static shape (rank 1 to 4, the custom operator's limit),
constant gamma/beta/bias/fill, and only the first output read (ONNX Runtime's
SkipLayerNormalization may also return the mean, the inverse deviation and the sum, which
the kernel does not write).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from wpk.optimizer import attention_kernel, layer_norm

MS_DOMAIN = "com.microsoft"
ONNX_DOMAINS = ("", "ai.onnx")


class _Graph:
    """What the finders read of a saved graph: constants, static float shapes, readers."""

    def __init__(self, offline: onnx.ModelProto, model: onnx.ModelProto) -> None:
        from wpk.optimizer import ort_ops
        from wpk.optimizer.selection import shapes_of

        self.consts = {i.name: i for i in offline.graph.initializer}
        self.shapes = {**shapes_of(offline), **shapes_of(model)}
        self.readers = ort_ops._readers(offline)
        self.producer = {o: n for n in offline.graph.node for o in n.output}
        self.outputs = {o.name for o in offline.graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        init = self.consts.get(name)
        if init is None or init.data_type != onnx.TensorProto.FLOAT:
            return None
        return numpy_helper.to_array(init)

    def static(self, name: str) -> tuple[int, ...] | None:
        shape = self.shapes.get(name)
        return shape if shape and 1 <= len(shape) <= 4 and all(d >= 1 for d in shape) else None

    def unread(self, names) -> bool:
        """Whether none of the tensors `names` is read or a graph output."""
        return all(not n or (n not in self.readers and n not in self.outputs) for n in names)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def _vector(g: _Graph, name: str, width: int) -> np.ndarray | None:
    value = g.constant(name)
    return None if value is None or value.size != width else value.reshape(-1)


def sites(offline: onnx.ModelProto, model: onnx.ModelProto, kinds,
          threads: int | None = None) -> list:
    """The sites of each of `kinds` ("layer_norm", "nan_guard", "attention") in `offline`
    (ONNX Runtime's saved graph of `model`), its shapes inferred once for all of them."""
    finders = {"layer_norm": _layer_norms, "nan_guard": _nan_guards, "attention": _attentions}
    if not any(kind in finders for kind in kinds):
        return []
    g = _Graph(offline, model)
    threads = threads or os.cpu_count() or 1
    return [spec for kind in kinds if kind in finders
            for spec in finders[kind](g, offline, threads)]


def layer_norm_sites(offline: onnx.ModelProto, model: onnx.ModelProto,
                     threads: int | None = None) -> list:
    """KernelSpecs (op "layer_norm") for the SkipLayerNormalization and last-axis
    LayerNormalization nodes of `offline` (ONNX Runtime's saved graph of `model`)."""
    return sites(offline, model, ("layer_norm",), threads)


def _layer_norms(g: _Graph, offline: onnx.ModelProto, threads: int) -> list:
    found = (_layer_norm_site(g, node, threads) for node in offline.graph.node)
    return [spec for spec in found if spec is not None]


def _layer_norm_site(g: _Graph, node: onnx.NodeProto, threads: int):
    from wpk.optimizer.kernels import KernelSpec

    skip = node.op_type == "SkipLayerNormalization" and node.domain == MS_DOMAIN
    plain = node.op_type == "LayerNormalization" and node.domain in ONNX_DOMAINS
    if not (skip or plain) or not node.name or not g.unread(node.output[1:]):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    shape = g.static(node.input[0]) or g.static(node.output[0])
    if shape is None or not layer_norm.supported(shape[-1]) or \
            plain and attrs.get("axis", -1) not in (-1, len(shape) - 1) or \
            skip and g.static(node.input[1]) != shape:   # a broadcast skip, or unknown
        return None
    weights = _layer_norm_weights(g, node, skip, shape[-1])
    if weights is None:
        return None
    params = dict(rows=int(np.prod(shape[:-1])), width=shape[-1],
                  epsilon=float(attrs.get("epsilon", 1e-5)), skip=skip, bias="B" in weights,
                  residual=skip, threads=threads, y_shape=tuple(shape),
                  name="n_" + _safe(node.name))
    sources = [node.input[0]] + ([node.input[1]] if skip else []) + [node.output[0]]
    return KernelSpec("layer_norm", params, sources, node.output[0], node.name,
                      weights=weights)


def _layer_norm_weights(g: _Graph, node: onnx.NodeProto, skip: bool, width: int
                        ) -> dict[str, np.ndarray] | None:
    """gamma, beta (zeros where absent) and B (the skip variant's bias, where present) of a
    layer norm, or None where one is not a constant vector of `width` floats."""
    positions = {"gamma": 2, "beta": 3, "B": 4} if skip else {"gamma": 1, "beta": 2}
    weights = {}
    for key, position in positions.items():
        if len(node.input) <= position or not node.input[position]:
            continue
        value = _vector(g, node.input[position], width)
        if value is None:
            return None
        weights[key] = value.astype(np.float32)
    if "gamma" not in weights:
        return None
    weights.setdefault("beta", np.zeros(width, np.float32))
    return weights


def nan_guard_sites(offline: onnx.ModelProto, model: onnx.ModelProto,
                    threads: int | None = None) -> list:
    """KernelSpecs (op "nan_guard") for each `Where(IsNaN(x), c, x)` of `offline` with a
    constant scalar c and an IsNaN read by that Where alone."""
    return sites(offline, model, ("nan_guard",), threads)


def _nan_guards(g: _Graph, offline: onnx.ModelProto, threads: int) -> list:
    from wpk.optimizer.kernels import KernelSpec

    specs = []
    for node in offline.graph.node:
        if node.op_type != "Where" or node.domain not in ONNX_DOMAINS or len(node.input) != 3:
            continue
        cond, fill, x = node.input
        test = g.producer.get(cond)
        fill_value = g.constant(fill)
        shape = g.static(node.output[0])   # x's: cond is IsNaN(x), the fill a scalar
        if test is None or test.op_type != "IsNaN" or test.input[0] != x or \
                len(g.readers.get(cond, [])) != 1 or cond in g.outputs or \
                fill_value is None or fill_value.size != 1 or shape is None or \
                not node.name or not test.name:
            continue
        params = dict(size=int(np.prod(shape)), threads=threads,
                      y_shape=tuple(shape), residual=False, name="nan_" + _safe(node.name))
        specs.append(KernelSpec("nan_guard", params, [x, node.output[0]], node.output[0],
                                f"{test.name}+{node.name}",
                                weights={"fill": fill_value.reshape(1).astype(np.float32)}))
    return specs


def attention_sites(offline: onnx.ModelProto, model: onnx.ModelProto,
                    threads: int | None = None) -> list:
    """KernelSpecs (op "attention") for ONNX Runtime's `Attention` (packed QKV weights) and
    `MultiHeadAttention` (Q, K and V tensors) nodes of `offline` over one sequence (batch 1),
    with no mask index, no past state and no rotary embedding; an attention bias of shape
    [1, 1 or heads, S, L] is taken in."""
    return sites(offline, model, ("attention",), threads)


def _attentions(g: _Graph, offline: onnx.ModelProto, threads: int) -> list:
    specs = []
    for node in offline.graph.node:
        if node.domain != MS_DOMAIN or not node.name or not g.unread(node.output[1:]):
            continue
        if node.op_type == "Attention":
            spec = _packed_attention_site(g, node, threads)
        elif node.op_type == "MultiHeadAttention":
            spec = _multi_head_site(g, node, threads)
        else:
            continue
        if spec is not None:
            specs.append(spec)
    return specs


def _optional(node: onnx.NodeProto, position: int) -> str:
    return node.input[position] if len(node.input) > position else ""


def _attention_params(g: _Graph, node: onnx.NodeProto, s: int, keys: int, hidden: int,
                      bias: str, threads: int) -> dict | None:
    """The kernel's parameters, or None where the node asks for what it does not do."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    heads = int(attrs.get("num_heads", 0))
    if heads < 1 or hidden % heads or attrs.get("unidirectional", 0) or \
            attrs.get("do_rotary", 0) or attrs.get("qkv_hidden_sizes") or \
            attrs.get("past_present_share_buffer", 0):
        return None
    head_size = hidden // heads
    if not attention_kernel.supported(head_size, keys):
        return None
    bias_heads = 0
    if bias:
        shape = g.static(bias)
        if shape is None or len(shape) != 4 or shape[0] != 1 or shape[1] not in (1, heads) or \
                tuple(shape[2:]) != (s, keys):
            return None
        bias_heads = shape[1]
    scale = float(attrs.get("scale", 0.0)) or head_size ** -0.5
    return dict(s=s, l=keys, heads=heads, head_size=head_size, scale=scale,
                bias_heads=bias_heads, threads=threads, residual=bias_heads > 0,
                y_shape=(1, s, hidden), name="a_" + _safe(node.name))


def _packed_attention_site(g: _Graph, node: onnx.NodeProto, threads: int):
    from wpk.optimizer.kernels import KernelSpec

    # inputs: X, weights, bias, mask_index, past, attention_bias (, past_sequence_length)
    if len(node.input) < 2 or _optional(node, 3) or _optional(node, 4) or \
            _optional(node, 6):
        return None
    shape = g.static(node.input[0])
    weight = g.constant(node.input[1])
    if shape is None or len(shape) != 3 or shape[0] != 1 or weight is None or \
            weight.shape != (shape[2], 3 * shape[2]):
        return None
    hidden = shape[2]
    qkv_bias = _vector(g, _optional(node, 2), 3 * hidden) if _optional(node, 2) else \
        np.zeros(3 * hidden, np.float32)
    bias = _optional(node, 5)
    params = _attention_params(g, node, shape[1], shape[1], hidden, bias, threads)
    if qkv_bias is None or params is None:
        return None
    params["packed"] = True
    return KernelSpec("attention", params, [node.input[0], node.input[1], bias, node.output[0]],
                      node.output[0], node.name,
                      weights={"B": qkv_bias.astype(np.float32)})


def _multi_head_site(g: _Graph, node: onnx.NodeProto, threads: int):
    from wpk.optimizer.kernels import KernelSpec

    # inputs: query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value
    if len(node.input) < 3 or any(_optional(node, i) for i in (3, 4, 6, 7)):
        return None
    query, key, value = (g.static(n) for n in node.input[:3])
    if query is None or key is None or key != value or len(query) != 3 or len(key) != 3 or \
            query[0] != 1 or key[0] != 1 or key[2] != query[2]:
        return None
    bias = _optional(node, 5)
    params = _attention_params(g, node, query[1], key[1], query[2], bias, threads)
    if params is None:
        return None
    params["packed"] = False
    return KernelSpec("attention", params, [*node.input[:3], bias, node.output[0]],
                      node.output[0], node.name)
