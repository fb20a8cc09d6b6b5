"""Between Open Inference Protocol tensors and numpy arrays: datatypes, checks, raw bytes.

Every check raises `TensorError` with a message naming the model and tensor; the server turns
it into INVALID_ARGUMENT.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

# KServe v2 datatype <-> numpy dtype (BYTES and BF16 are not served by wpk tiers)
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}

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
        return _NAMES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TensorError(f"dtype {dtype} has no Open Inference Protocol datatype") from None


def dtype_of(datatype: str) -> np.dtype:
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise TensorError(f"unsupported datatype {datatype!r} "
                          f"(supported: {', '.join(DATATYPES)})") from None


@dataclass(frozen=True)
class TensorMeta:
    """What a model takes or returns: -1 marks a dimension of any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_spec(cls, name: str, dtype: str, shape: Iterable) -> "TensorMeta":
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape)
        return cls(name, datatype_of(dtype), dims)

    def fits(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(
            want < 0 or want == got for want, got in zip(self.shape, shape))


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def check_tensor(model: str, meta: TensorMeta, datatype: str, shape: Sequence[int]) -> None:
    if datatype != meta.datatype:
        raise TensorError(f"model {model!r} input {meta.name!r}: datatype {datatype}, "
                          f"expected {meta.datatype}")
    if any(d < 0 for d in shape) or not meta.fits(shape):
        raise TensorError(f"model {model!r} input {meta.name!r}: shape {shape_text(shape)}, "
                          f"expected {shape_text(meta.shape)}")


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


def raw_bytes(array: np.ndarray) -> bytes:
    """Row-major bytes of `array` (one copy at most)."""
    return np.ascontiguousarray(array).tobytes()


def select(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: arrays[name] for name in names}
