"""Between Open Inference Protocol tensors and numpy arrays: datatypes, checks, raw bytes.

Every check raises `TensorError` with a message naming the model and tensor; the server turns
it into INVALID_ARGUMENT.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from wpk.tensor_spec import TensorSpec, kserve_datatype_of, numpy_dtype_of

# which InferTensorContents field holds each datatype when contents are typed
TYPED_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}


class TensorError(ValueError):
    """A request tensor that does not fit the model: one line, naming model and tensor."""


def datatype_of(dtype: np.dtype | str) -> str:
    """KServe datatype name of a numpy dtype ("float32" -> "FP32")."""
    try:
        return kserve_datatype_of(dtype)
    except ValueError as error:
        raise TensorError(str(error)) from None


def dtype_of(datatype: str) -> np.dtype:
    try:
        return numpy_dtype_of(datatype)
    except ValueError as error:
        raise TensorError(str(error)) from None


def served_spec(name: str, dtype: str, shape: Iterable[int]) -> TensorSpec:
    """A plan's tensor as a tier serves it: -1 marks a dimension of any size (as in
    ModelMetadata); TensorError for a dtype the Open Inference Protocol has no datatype for."""
    datatype_of(dtype)
    return TensorSpec.of(name, (d if d > 0 else -1 for d in shape), dtype)


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def check_tensor(model: str, spec: TensorSpec, datatype: str, shape: Sequence[int]) -> None:
    if datatype != spec.kserve_datatype:
        raise TensorError(f"model {model!r} input {spec.name!r}: datatype {datatype}, "
                          f"expected {spec.kserve_datatype}")
    if any(d < 0 for d in shape) or not spec.fits(shape):
        raise TensorError(f"model {model!r} input {spec.name!r}: shape {shape_text(shape)}, "
                          f"expected {shape_text(spec.shape)}")


def array_from_raw(model: str, name: str, datatype: str, shape: Sequence[int],
                   data: bytes) -> np.ndarray:
    """A read-only view of `data` as an array; checks the byte count."""
    dtype = dtype_of(datatype)
    count = math.prod(shape)
    if len(data) != count * dtype.itemsize:
        raise TensorError(f"model {model!r} input {name!r}: raw contents hold {len(data)} "
                          f"bytes, shape {shape_text(shape)} {datatype} needs "
                          f"{count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def array_from_typed(model: str, name: str, datatype: str, shape: Sequence[int],
                     contents) -> np.ndarray:
    """An array from typed InferTensorContents; checks the element count."""
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise TensorError(f"model {model!r} input {name!r}: datatype {datatype} must travel "
                          f"as raw_input_contents")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise TensorError(f"model {model!r} input {name!r}: {field} holds {len(values)} "
                          f"values, shape {shape_text(shape)} needs {count}")
    return np.asarray(values, dtype=dtype_of(datatype)).reshape(shape)
