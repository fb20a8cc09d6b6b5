"""The conformance corpus: models nobody here wrote, obtained without any download at run time.

- `light`: the topologies in the onnx wheel's backend test data (opset 9, constant weights).
- `pip`: pretrained models inside pip packages (PP-OCRv4 in rapidocr-onnxruntime, the VAD
  model in silero-vad), installed with `pip install --no-deps -r benchmarks/zoo-models.txt`:
  their .onnx files are read, the packages are never imported.
- `variant`: what real files look like, made from those: nodes without names, weights in a
  side file, fp16, QDQ int8, newer opsets.
- `torch`: architectures exported from the CPU build of torch/torchvision/transformers, with
  both of torch's exporters and a symbolic batch dimension (benchmark only: torch is heavy).
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

SITE_PACKAGES_HINT = "pip install --no-deps -r benchmarks/zoo-models.txt"


@dataclass(frozen=True)
class ZooModel:
    """One corpus entry: where it comes from and how to fix its input shapes."""

    name: str
    group: str                                   # light | pip | variant | torch
    make: Callable[[Path], Path]                 # writes (or finds) the .onnx, returns its path
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    note: str = ""

    def shape_args(self) -> list[str]:
        return [f"{k}={'x'.join(map(str, v))}" for k, v in self.input_shapes.items()]


class MissingModel(Exception):
    """The package that carries a model is not installed (the message says how to get it)."""


# -- light: the onnx wheel's test topologies ----------------------------------------------------
LIGHT = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
         "shufflenet", "squeezenet", "vgg19", "zfnet512"]


def light_path(name: str) -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def _light(name: str) -> Callable[[Path], Path]:
    return lambda _: light_path(name)


# -- pip: pretrained models inside packages --------------------------------------------------
def package_file(distribution: str, relative: str) -> Path:
    """A file a distribution installed, found through its metadata (nothing is imported)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingModel(f"{distribution} is not installed ({SITE_PACKAGES_HINT})") from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise MissingModel(f"{distribution} has no {relative}")
    return path


def _packaged(distribution: str, relative: str) -> Callable[[Path], Path]:
    return lambda _: package_file(distribution, relative)


OCR = "rapidocr-onnxruntime"
VAD = "silero-vad"


# -- variants of real files ---------------------------------------------------------------------
def _variant(name: str, transform: Callable[[onnx.ModelProto, Path], Path]
             ) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        return transform(onnx.load(str(light_path(name))), directory)
    return make


def unnamed(model: onnx.ModelProto, directory: Path) -> Path:
    for node in model.graph.node:
        node.name = ""
    path = directory / "squeezenet_unnamed.onnx"
    onnx.save(model, str(path))
    return path


def external_data(model: onnx.ModelProto, directory: Path) -> Path:
    """Weights in a side file, as exporters write models over 2 GB. The light models make
    their weights with ConstantOfShape: fold them into initializers first."""
    model = _folded(model)
    path = directory / "resnet50_external.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="resnet50_external.weights")   # tensors over 1 KB, as exporters do
    return path


def fp16(model: onnx.ModelProto, directory: Path) -> Path:
    """Half-precision weights and activations, float32 at the model's edges (what
    onnxconverter-common's convert_float_to_float16(keep_io_types=True) writes)."""
    from onnxconverter_common import float16

    half = float16.convert_float_to_float16(_folded(model), keep_io_types=True)
    path = directory / "squeezenet_fp16.onnx"
    onnx.save(half, str(path))
    return path


def qdq_int8(model: onnx.ModelProto, directory: Path) -> Path:
    """Static QDQ int8 from ONNX Runtime's quantizer, calibrated on random images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    source = directory / "squeezenet_fp32.onnx"
    onnx.save(_folded(model), str(source))
    image = onnx.load(str(source)).graph.input[0]
    name, shape = image.name, [d.dim_value for d in image.type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)

    class Images(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]

        def get_next(self):
            return self.left.pop() if self.left else None

    path = directory / "squeezenet_qdq.onnx"
    quantize_static(str(source), str(path), Images(), quant_format=QuantFormat.QDQ)
    return path


def newer_opset(target: int | None) -> Callable[[onnx.ModelProto, Path], Path]:
    def convert(model: onnx.ModelProto, directory: Path) -> Path:
        from onnx import version_converter

        opset = target or newest_runnable_opset()
        converted = version_converter.convert_version(_folded(model), opset)
        path = directory / f"squeezenet_opset{opset}.onnx"
        onnx.save(converted, str(path))
        return path
    return convert


def newest_runnable_opset() -> int:
    """The newest opset both onnx and this ONNX Runtime know."""
    import onnxruntime as ort
    from onnx import helper

    for opset in range(onnx.defs.onnx_opset_version(), 8, -1):
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:  # ORT: "support is till opset N"
            continue
    return 9


def _folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """ConstantOfShape weights evaluated into initializers (real files carry real tensors)."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    constant = [n for n in model.graph.node if n.op_type == "ConstantOfShape"]
    if not constant:
        return model
    values = ReferenceEvaluator(_constants_only(model, constant)).run(
        None, {})
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    outputs = [n.output[0] for n in constant]
    keep = [n for n in folded.graph.node if n.op_type != "ConstantOfShape"]
    del folded.graph.node[:]
    folded.graph.node.extend(keep)
    rng = np.random.default_rng(0)
    for name, value in zip(outputs, values):
        if value.ndim >= 2:   # weights: distinct values at a scale that keeps deep stacks finite
            fan_in = int(np.prod(value.shape[1:]))
            value = (rng.standard_normal(value.shape) * np.sqrt(1.0 / fan_in)).astype(value.dtype)
        folded.graph.initializer.append(numpy_helper.from_array(value, name))
    # initializers listed as inputs too (IR 3) would be overridable inputs: modern files don't
    weights = {i.name for i in folded.graph.initializer}
    consumed = {i for n in folded.graph.node for i in n.input}
    kept = [v for v in folded.graph.input if v.name not in weights and v.name in consumed]
    del folded.graph.input[:]
    folded.graph.input.extend(kept)
    used = [i for i in folded.graph.initializer if i.name in consumed]
    del folded.graph.initializer[:]
    folded.graph.initializer.extend(used)
    folded.ir_version = max(folded.ir_version, 4)   # initializers need not be inputs
    return folded


def _constants_only(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    from onnx import helper

    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, "constants", [], [helper.make_tensor_value_info(n.output[0], 0, None) for n in nodes],
        [i for i in model.graph.initializer if i.name in used])
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def corpus() -> list[ZooModel]:
    """The models CI runs every stage on (the torch exports are in `torch_corpus`)."""
    models = [ZooModel(f"{name}", "light", _light(name)) for name in LIGHT]
    ocr = "rapidocr_onnxruntime/models/"
    models += [
        ZooModel("ppocrv4_det", "pip", _packaged(OCR, ocr + "ch_PP-OCRv4_det_infer.onnx"),
                 {"x": (1, 3, 640, 640)}, "PP-OCRv4 text detector"),
        ZooModel("ppocrv4_rec", "pip", _packaged(OCR, ocr + "ch_PP-OCRv4_rec_infer.onnx"),
                 {"x": (1, 3, 48, 320)}, "PP-OCRv4 text recognizer"),
        ZooModel("ppocr_cls", "pip", _packaged(OCR, ocr + "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
                 {"x": (1, 3, 48, 192)}, "PP-OCR direction classifier"),
        ZooModel("silero_vad", "pip", _packaged(VAD, "silero_vad/data/silero_vad.onnx"),
                 {"input": (1, 512), "state": (2, 1, 128)},
                 "If on the sample-rate input; LSTM inside the branches"),
        ZooModel("silero_vad_op15", "pip",
                 _packaged(VAD, "silero_vad/data/silero_vad_16k_op15.onnx"),
                 {"input": (1, 512), "state": (2, 1, 128)}, "16 kHz only, If over weights"),
        ZooModel("silero_vad_lstm", "pip",
                 _packaged(VAD, "silero_vad/data/silero_vad_16k_sequence.onnx"),
                 {"input": (4, 576)}, "LSTM over a sequence"),
        ZooModel("squeezenet_unnamed", "variant", _variant("squeezenet", unnamed),
                 note="every node name empty"),
        ZooModel("resnet50_external", "variant", _variant("resnet50", external_data),
                 note="weights in a side file"),
        ZooModel("squeezenet_fp16", "variant", _variant("squeezenet", fp16),
                 note="fp16 inside, fp32 at the edges"),
        ZooModel("squeezenet_qdq", "variant", _variant("squeezenet", qdq_int8),
                 note="static QDQ int8"),
        ZooModel("squeezenet_opset13", "variant", _variant("squeezenet", newer_opset(13))),
        ZooModel("squeezenet_opset_newest", "variant", _variant("squeezenet", newer_opset(None)),
                 note="the newest opset this ONNX Runtime runs"),
    ]
    return models
