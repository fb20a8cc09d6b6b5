"""Payload formats: bytes on an input topic -> named input tensors; outputs -> result bytes.

Decoding happens in two steps so that stateful formats (Sparkplug) see messages in arrival
order even while the pipeline is away: `parse` runs when a message arrives and needs nothing
but the bytes; `to_inputs` runs once the model's signature is known. Both raise PayloadError
with a one-line reason for anything malformed; the bridge reports it on its error topic.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from wpk.plan import SourceModel
from wpk.tensor_spec import KSERVE_DATATYPES

from .tensors import fit, model_input, single_input

INPUT_FORMATS = ("raw", "npy", "json", "sparkplug")
RESULT_FORMATS = ("json", "raw", "npy")


class PayloadError(ValueError):
    """A message the bridge cannot turn into model inputs; the text is the reason."""


@dataclass
class Parsed:
    """What `parse` made of one message."""

    body: Any                      # format-specific: bytes, arrays, metric snapshot
    infer: bool = True             # False: nothing to run (e.g. a Sparkplug BIRTH)
    source_timestamp_ms: float | None = None
    echo: dict[str, Any] = field(default_factory=dict)  # copied into the JSON result


class InputFormat(Protocol):
    name: str

    def parse(self, topic: str, payload: bytes) -> Parsed: ...

    def to_inputs(self, parsed: Parsed, signature: SourceModel) -> dict[str, np.ndarray]: ...


def _fit(signature: SourceModel, name: str, array: np.ndarray) -> np.ndarray:
    try:
        return fit(model_input(signature, name), array)
    except ValueError as error:
        raise PayloadError(str(error)) from None


def _fit_all(signature: SourceModel, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [s.name for s in signature.inputs if s.name not in arrays]
    extra = sorted(set(arrays) - {s.name for s in signature.inputs})
    if missing or extra:
        problems = [f"missing input(s) {', '.join(missing)}"] if missing else []
        problems += [f"unknown input(s) {', '.join(extra)}"] if extra else []
        raise PayloadError(f"{'; '.join(problems)} for model {signature.name!r} (inputs: "
                           f"{', '.join(s.name for s in signature.inputs)})")
    return {name: _fit(signature, name, array) for name, array in arrays.items()}


class RawFormat:
    """Little-endian tensor bytes; dtype and shape come from the model's metadata."""

    name = "raw"

    def __init__(self, input_name: str | None = None):
        self.input_name = input_name

    def parse(self, topic: str, payload: bytes) -> Parsed:
        if not payload:
            raise PayloadError("empty payload")
        return Parsed(payload)

    def to_inputs(self, parsed: Parsed, signature: SourceModel) -> dict[str, np.ndarray]:
        try:
            spec = model_input(signature, self.input_name) if self.input_name \
                else single_input(signature, self.name)
        except ValueError as error:
            raise PayloadError(str(error)) from None
        payload: bytes = parsed.body
        itemsize = spec.numpy_dtype.itemsize
        if len(payload) % itemsize:
            raise PayloadError(f"raw payload of {len(payload)} bytes is not a whole number of "
                               f"{spec.kserve_datatype} values for input {spec.name!r}")
        shape = spec.concrete_shape(len(payload) // itemsize)
        if shape is None:
            raise PayloadError(f"raw payload of {len(payload)} bytes does not fit input "
                               f"{spec.name!r} {list(spec.shape)} {spec.kserve_datatype}")
        dtype = spec.numpy_dtype
        array = np.frombuffer(payload, dtype=dtype.newbyteorder("<")).reshape(shape)
        return {spec.name: array.astype(dtype, copy=False)}


class NpyFormat:
    """A `.npy` file (one input) or a `.npz` archive (one entry per input name)."""

    name = "npy"

    def __init__(self, input_name: str | None = None):
        self.input_name = input_name

    def parse(self, topic: str, payload: bytes) -> Parsed:
        try:
            loaded = np.load(io.BytesIO(payload), allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    return Parsed({name: loaded[name] for name in loaded.files})
            return Parsed(loaded)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise PayloadError(f"not a .npy/.npz payload: {error}") from None

    def to_inputs(self, parsed: Parsed, signature: SourceModel) -> dict[str, np.ndarray]:
        if isinstance(parsed.body, dict):
            return _fit_all(signature, parsed.body)
        try:
            name = self.input_name or single_input(signature, self.name).name
        except ValueError as error:
            raise PayloadError(str(error)) from None
        return {name: _fit(signature, name, parsed.body)}


class JsonFormat:
    """`{"inputs": {"name": [..]}, "id": .., "timestamp": ms}`; also KServe v2 REST's
    `{"inputs": [{"name": .., "shape": .., "datatype": .., "data": [..]}]}`."""

    name = "json"

    def parse(self, topic: str, payload: bytes) -> Parsed:
        try:
            document = json.loads(payload, parse_constant=_not_json)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise PayloadError(f"invalid JSON: {error}") from None
        except RecursionError:
            raise PayloadError("invalid JSON: nested too deeply") from None
        if not isinstance(document, dict) or "inputs" not in document:
            raise PayloadError('JSON payload needs an "inputs" object')
        arrays = _json_inputs(document["inputs"])
        echo = {"id": document["id"]} if "id" in document else {}
        timestamp = document.get("timestamp")
        if timestamp is not None and not isinstance(timestamp, (int, float)):
            raise PayloadError('"timestamp" must be milliseconds since the Unix epoch')
        return Parsed(arrays, source_timestamp_ms=timestamp, echo=echo)

    def to_inputs(self, parsed: Parsed, signature: SourceModel) -> dict[str, np.ndarray]:
        return _fit_all(signature, parsed.body)


def _not_json(constant: str) -> Any:
    """Python's json module reads NaN and Infinity, which JSON does not have."""
    raise PayloadError(f"invalid JSON: {constant} is not a JSON number")


def _json_inputs(inputs: Any) -> dict[str, np.ndarray]:
    if isinstance(inputs, dict):
        items = [(name, value) for name, value in inputs.items()]
    elif isinstance(inputs, list):
        try:
            items = [(entry["name"], entry) for entry in inputs]
        except (TypeError, KeyError):
            raise PayloadError('each entry of "inputs" needs a "name"') from None
    else:
        raise PayloadError('"inputs" must be an object or a list')
    arrays = {}
    for name, value in items:
        dtype = None
        if isinstance(value, dict):  # {"data": [...], "shape": [...], "datatype": "FP32"}
            if "data" not in value:
                raise PayloadError(f'input {name!r}: object without "data"')
            dtype = KSERVE_DATATYPES.get(value.get("datatype", ""), None)
            shape = value.get("shape")
            value = value["data"]
        else:
            shape = None
        try:
            array = np.asarray(value, dtype=dtype)
            if shape is not None:
                array = array.reshape(shape)
        except (ValueError, TypeError) as error:
            reason = "ragged nesting: not a rectangular array" if "inhomogeneous" in str(error) \
                else str(error)
            raise PayloadError(f"input {name!r}: {reason}") from None
        except RecursionError:
            raise PayloadError(f"input {name!r}: nested too deeply") from None
        if array.dtype.kind not in "biuf":
            raise PayloadError(f"input {name!r}: not a (rectangular) array of numbers")
        arrays[name] = array
    return arrays


def make_input_format(name: str, *, input_name: str | None = None,
                      metrics: list[str] | None = None) -> InputFormat:
    if name == "raw":
        return RawFormat(input_name)
    if name == "npy":
        return NpyFormat(input_name)
    if name == "json":
        return JsonFormat()
    if name == "sparkplug":
        from .sparkplug import SparkplugFormat
        return SparkplugFormat(metrics)
    raise ValueError(f"unknown input format {name!r} (choose from {', '.join(INPUT_FORMATS)})")


# ---- results -------------------------------------------------------------------------------

def _json_values(array: np.ndarray) -> Any:
    """Nested lists; a NaN or infinity becomes the string "NaN", "Infinity" or "-Infinity",
    as protobuf's JSON mapping writes them (JSON itself has no such numbers)."""
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return array.tolist()
    values = array.astype(object)
    values[np.isnan(array)] = "NaN"
    values[np.isposinf(array)] = "Infinity"
    values[np.isneginf(array)] = "-Infinity"
    return values.tolist()


def little_endian_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_result(result_format: str, outputs: dict[str, np.ndarray], meta: dict[str, Any],
                  output_name: str | None = None) -> bytes:
    """JSON: meta plus `"outputs": {name: nested list}`; raw/npy: one output tensor."""
    if result_format == "json":
        document = dict(meta)
        document["outputs"] = {name: _json_values(array) for name, array in outputs.items()}
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    if output_name is None:
        if len(outputs) != 1:
            raise ValueError(f"{result_format} results carry one tensor; the model has outputs "
                             f"{', '.join(outputs)}: choose one with --output")
        output_name = next(iter(outputs))
    array = outputs[output_name]
    if result_format == "raw":
        return little_endian_bytes(array)
    if result_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()
    raise ValueError(f"unknown result format {result_format!r}")
