"""The patterns real exporters write, in blocks exported by torch from torchvision's own classes
(`blocks/export_blocks.py`): the optimizer's generated kernels find their sites in ONNX
Runtime's saved graph and the whole block, run with them as custom operators, gives ONNX
Runtime's outputs."""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from wpk.optimizer import ort_ops, passes, winograd
from wpk.optimizer.executor import load
from wpk.optimizer.pipeline import save_custom_ops
from wpk.optimizer.selection import select_custom_ops
from wpk.optimizer.session import DEFAULT_SESSION

BLOCKS = Path(__file__).parent / "blocks"
pytestmark = pytest.mark.skipif(not ort_ops.runs_here()[0], reason=ort_ops.runs_here()[1])


def _block(name: str, tmp_path: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The block after wpk's graph passes, and ONNX Runtime's saved graph of it."""
    model, _ = passes.run_passes(onnx.load(str(BLOCKS / f"{name}.onnx")))
    onnx.save(model, str(tmp_path / "model.onnx"))
    passes.ort_offline_optimize(tmp_path / "model.onnx", tmp_path / "offline.onnx", "all", 0)
    return model, onnx.load(str(tmp_path / "offline.onnx"))


def _run_with_every_kernel(model, offline, tmp_path, expected_ops: dict[str, int]) -> None:
    """Every site runs its preferred kernel (no timing); the block's outputs match ORT's."""
    feed = {"x": np.random.default_rng(3).standard_normal(
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    ).astype(np.float32)}
    inside = select_custom_ops(model, offline, dict(DEFAULT_SESSION), feed, ["y"], passes=0,
                               start_with_kernels=True)
    assert inside is not None
    ops = {}
    for spec in inside.specs:
        ops[spec.op] = ops.get(spec.op, 0) + 1
    assert ops == expected_ops
    session = load(save_custom_ops(model, inside, tmp_path / "opt"))
    assert session.segments[0].model_file == "model.wpk.onnx"
    reference = ort.InferenceSession(model.SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    for seed in range(2):
        x = np.random.default_rng(seed).standard_normal(feed["x"].shape).astype(np.float32)
        want = reference.run(["y"], {"x": 4 * x})[0]      # wide enough to reach Clip's 6
        got = session.run(["y"], {"x": 4 * x})[0]
        assert np.linalg.norm(got - want) <= winograd.TOLERANCE * np.linalg.norm(want)


def test_sites_are_found_by_weights_when_convs_share_one_bias(tmp_path):
    """Identity BatchNorms: torch shares one all-zero bias between the Convs; the Winograd
    site (3x3 stride 1, with the block's residual Add and Relu) is still found."""
    original = onnx.load(str(BLOCKS / "resnet_basic_identity_bn.onnx"))
    assert any(n.op_type == "Identity" for n in original.graph.node)   # the shared bias
    model, offline = _block("resnet_basic_identity_bn", tmp_path)
    sites = ort_ops.nchwc_sites(offline, model)
    assert [(s.params["relu"], s.params["residual"]) for s in sites] == [("relu", True)]
    _run_with_every_kernel(model, offline, tmp_path, {"winograd": 1})


@pytest.mark.parametrize("name", ["mobilenet_v2_residual", "mobilenet_v2_stride2"])
def test_relu6_exported_as_clip_fuses_into_the_inverted_residual(name, tmp_path):
    model, offline = _block(name, tmp_path)
    assert sum(n.op_type == "Clip" for n in model.graph.node) == 2
    sites = ort_ops.depthwise_sites(offline, model)
    assert [(s.params["relu_expand"], s.params["relu"]) for s in sites] == \
        [("clip:0.0:6.0", "clip:0.0:6.0")]
    projected = ort_ops.depthwise_sites(offline, model, project=True)
    assert [s.params["cout"] for s in projected] == [32 if "residual" in name else 48]
    _run_with_every_kernel(model, offline, tmp_path, {"nchwc_depthwise": 1})


@pytest.mark.parametrize("name", ["efficientnet_mbconv", "mobilenet_v3_hardswish_se"])
def test_squeeze_excitation_scales_in_the_blocked_layout(name, tmp_path):
    """The SE block's broadcast Mul: ONNX Runtime leaves the blocked layout for it (a
    ReorderOutput and a ReorderInput of the block's largest tensor); the channel-scale
    kernel takes their place."""
    model, offline = _block(name, tmp_path)
    sites = ort_ops.channel_scale_sites(offline, model)
    assert len(sites) == 1 and len(sites[0].node.split("+")) == 3
    reorders = [n.op_type for n in offline.graph.node if n.op_type.startswith("Reorder")]
    inside = select_custom_ops(model, offline, dict(DEFAULT_SESSION), {"x": np.zeros(
        (1, 32, 28, 28), np.float32)}, ["y"], passes=0, start_with_kernels=True)
    kept = [n.op_type for n in inside.model.graph.node if n.op_type.startswith("Reorder")]
    assert len(kept) == len(reorders) - 2
    _run_with_every_kernel(model, offline, tmp_path, {"channel_scale": 1, "nchwc_depthwise": 1})


@pytest.mark.parametrize("name, activation", [("efficientnet_mbconv", "swish:1.0"),
                                              ("mobilenet_v3_hardswish_se", "hardswish")])
def test_silu_and_hardswish_fuse_into_the_depthwise_kernel(name, activation, tmp_path):
    """SiLU (torch: x * Sigmoid(x); ONNX Runtime: a QuickGelu node after the Conv) and
    HardSwish (fused into ONNX Runtime's Conv) after the expansion and the depthwise Conv."""
    model, offline = _block(name, tmp_path)
    sites = ort_ops.depthwise_sites(offline, model)
    assert [(s.params["relu_expand"], s.params["relu"]) for s in sites] == \
        [(activation, activation)]
    quick_gelus = {n.name for n in offline.graph.node if n.op_type == "QuickGelu"}
    assert len(quick_gelus & set(sites[0].node.split("+"))) == (2 if activation.startswith("swish")
                                                                  else 0)


def test_batchnorm_left_as_nodes_is_folded_and_the_block_still_fuses(tmp_path):
    """An export with constant folding off keeps BatchNormalization nodes: wpk's pass folds
    them into the Convs, and the inverted residual is then a site like the folded export."""
    original = onnx.load(str(BLOCKS / "mobilenet_v2_unfused_bn.onnx"))
    assert sum(n.op_type == "BatchNormalization" for n in original.graph.node) == 3
    model, offline = _block("mobilenet_v2_unfused_bn", tmp_path)
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert len(ort_ops.depthwise_sites(offline, model, project=True)) == 1
    _run_with_every_kernel(model, offline, tmp_path, {"nchwc_depthwise": 1})
