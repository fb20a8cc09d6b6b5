"""Writes the torch-exported blocks the optimizer's pattern tests load (the .onnx files beside
this script): torchvision's own block classes and transformers' BERT encoder layers, exported by
torch's TorchScript exporter at
opset 17, as a user's real network would be. Kept small (few channels) so that they live in
the repository; the tests need no torch.

    pip install torch torchvision transformers && python tests/optimizer/blocks/export_blocks.py
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))   # the repository: benchmarks.zoo_torch


def blocks(torch, torchvision):
    """name -> (module, input shape)."""
    from torchvision.models import efficientnet, mobilenetv2, mobilenetv3, resnet

    torch.manual_seed(0)
    made = {}
    # identity BatchNorms (as `weights=None` leaves them): every folded bias is zero and
    # torch shares one initializer between the Convs
    made["resnet_basic_identity_bn"] = (resnet.BasicBlock(
        32, 32, stride=2, downsample=torch.nn.Sequential(
            torch.nn.Conv2d(32, 32, 1, stride=2, bias=False), torch.nn.BatchNorm2d(32))),
        (1, 32, 28, 28))
    # ReLU6, exported as Clip(0, 6); with the skip (stride 1) and without (stride 2)
    made["mobilenet_v2_residual"] = (mobilenetv2.InvertedResidual(32, 32, 1, 6), (1, 32, 28, 28))
    made["mobilenet_v2_stride2"] = (mobilenetv2.InvertedResidual(32, 48, 2, 6), (1, 32, 28, 28))
    # SiLU (Sigmoid * x) and squeeze-excitation with a broadcast Mul
    config = efficientnet.MBConvConfig(6, 3, 1, 32, 32, 1, 1.0, 1.0)
    made["efficientnet_mbconv"] = (efficientnet.MBConv(config, 0.0, torch.nn.BatchNorm2d),
                                   (1, 32, 28, 28))
    # HardSwish and squeeze-excitation with Hardsigmoid
    config3 = mobilenetv3.InvertedResidualConfig(32, 3, 96, 32, True, "HS", 1, 1, 1.0)
    made["mobilenet_v3_hardswish_se"] = (mobilenetv3.InvertedResidual(
        config3, torch.nn.BatchNorm2d), (1, 32, 28, 28))
    from benchmarks.zoo_torch import _randomized_batchnorm

    for name, (module, _) in made.items():
        if name != "resnet_basic_identity_bn":
            _randomized_batchnorm(module)
        module.eval()
    return made


def main() -> None:
    import torch
    try:
        import torchvision
    except RuntimeError:   # its C extension beside a CPU-only torch: the blocks need none of it
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, "
                                 "float iou_threshold) -> Tensor")
        import torchvision
    made = blocks(torch, torchvision)
    # the same inverted residual with its BatchNorms left as nodes (constant folding off, as
    # some export scripts have it)
    made["mobilenet_v2_unfused_bn"] = made["mobilenet_v2_residual"]
    for name, (module, shape) in made.items():
        path = HERE / f"{name}.onnx"
        with torch.no_grad():
            torch.onnx.export(module, (torch.randn(*shape),), str(path), input_names=["x"],
                              output_names=["y"], dynamo=False, opset_version=17,
                              do_constant_folding="unfused" not in name)
        print(f"{path.name}: {path.stat().st_size // 1024} KiB", file=sys.stderr)
    export_encoders(torch)


def export_encoders(torch) -> None:
    """Two-layer BERT-style encoders from transformers, with its default attention (torch's
    scaled_dot_product_attention) and with its "eager" one: the two patterns exporters write
    for attention. Inputs input_ids and attention_mask [1, 16], output y [1, 16, 32]; two heads
    of 16 (the attention kernel needs heads of whole 16-float vectors)."""
    from transformers import BertConfig, BertModel

    class Encoder(torch.nn.Module):
        def __init__(self, attention: str) -> None:
            super().__init__()
            config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, vocab_size=100,
                                max_position_embeddings=32)
            config._attn_implementation = attention
            self.bert = BertModel(config)

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             return_dict=False)[0]

    for attention in ("sdpa", "eager"):
        torch.manual_seed(0)
        module = Encoder(attention).eval()
        path = HERE / f"bert_{attention}_encoder.onnx"
        ids = torch.randint(0, 100, (1, 16))
        with torch.no_grad():
            torch.onnx.export(module, (ids, torch.ones(1, 16, dtype=torch.long)), str(path),
                              input_names=["input_ids", "attention_mask"], output_names=["y"],
                              dynamo=False, opset_version=17)
        print(f"{path.name}: {path.stat().st_size // 1024} KiB", file=sys.stderr)


if __name__ == "__main__":
    main()
