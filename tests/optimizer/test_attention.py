"""Attention blocks as torch exports them (transformers' BERT, `blocks/export_blocks.py`),
fused into ONNX Runtime's Attention (self-attention: Q, K and V projections packed into one
GEMM) or MultiHeadAttention by the optimizer's graph passes: every block is found, and the
encoder's outputs stay ONNX Runtime's on the original model, masked rows and all."""
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from wpk.optimizer import passes
from wpk.optimizer.attention import fuse_attention

BLOCKS = Path(__file__).parent / "blocks"
MASKS = {"padded": np.r_[np.ones(10), np.zeros(6)], "all keys": np.ones(16),
         "no key": np.zeros(16)}    # every key masked: the NaN guard's case


def _outputs(model: onnx.ModelProto, mask: np.ndarray) -> np.ndarray:
    feed = {"input_ids": np.random.default_rng(0).integers(0, 100, (1, 16)),
            "attention_mask": mask.astype(np.int64)[None]}
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_attention_block_becomes_one_operator_with_the_same_outputs(attention):
    """sdpa: the scale split over Q and K, keys transposed in one step, a NaN guard after the
    softmax; eager: one scale after the scores' MatMul."""
    original = onnx.load(str(BLOCKS / f"bert_{attention}_encoder.onnx"))
    fused, log = passes.run_passes(original)
    ops = Counter(n.op_type for n in fused.graph.node)
    # self-attention: the three projections packed into one GEMM (ORT's Attention)
    assert ops["Attention"] == 2 and ops["Softmax"] == 0, ops
    assert ops["MatMul"] == 2 * 3, ops    # per layer: output projection and the MLP's two
    assert any(line.startswith("fuse-attention") for line in log)
    for name, mask in MASKS.items():
        expected, got = _outputs(original, mask), _outputs(fused, mask)
        assert not np.isnan(got).any(), name
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected), name


def test_a_block_whose_scores_are_read_elsewhere_is_left_alone():
    """A tensor inside the block that something else reads (here: the first layer's
    probabilities, made a graph output) keeps that block as it is; the other still fuses."""
    model = passes.fold_shapes(onnx.load(str(BLOCKS / "bert_sdpa_encoder.onnx")))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.output.append(helper.make_tensor_value_info(softmax.output[0],
                                                            onnx.TensorProto.FLOAT, None))
    fused = fuse_attention(model)
    assert Counter(n.op_type for n in fused.graph.node)["Attention"] == 1


def test_projections_that_cannot_be_packed_leave_multi_head_attention():
    """A second reader of the query projection (made a graph output) keeps the three
    projections apart: the block still fuses, as MultiHeadAttention over them."""
    model = passes.fold_shapes(onnx.load(str(BLOCKS / "bert_eager_encoder.onnx")))
    query = next(n for n in model.graph.node if n.op_type == "Add" and "query" in n.name)
    model.graph.output.append(helper.make_tensor_value_info(query.output[0],
                                                            onnx.TensorProto.FLOAT, None))
    fused = passes.remove_dead_nodes(fuse_attention(model))
    ops = Counter(n.op_type for n in fused.graph.node)
    assert (ops["Attention"], ops["MultiHeadAttention"]) == (1, 1), ops
    for mask in MASKS.values():
        expected = _outputs(onnx.load(str(BLOCKS / "bert_eager_encoder.onnx")), mask)
        got = _outputs(fused, mask)
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)


def test_a_model_without_attention_comes_back_unchanged():
    model = onnx.load(str(BLOCKS / "mobilenet_v2_residual.onnx"))
    assert fuse_attention(model) is model
