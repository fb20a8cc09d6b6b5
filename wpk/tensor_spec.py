"""`TensorSpec`: a named tensor with a dtype and a shape, the one type for what a model, a
slice or a link takes and gives.

`dtype` is a numpy dtype name ("float32"); `kserve_datatype` is the Open Inference Protocol
name ("FP32") and `ort_type` ONNX Runtime's ("tensor(float)"). A dimension below 1 means
"any size" (`fits` accepts every size there).

ONNX Runtime's face: `from_ort` reads a NodeArg's name, shape and type text, and `type` is
`ort_type` under NodeArg's name, so that code written against ORT's get_inputs() (`i.name`,
`i.type`, `i.shape`) reads TensorSpecs too: optimized sessions (`wpk.optimizer.load`) and
calibration return them. One difference from ORT: a free dimension is -1, where ORT gives None
or the dimension's name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


# Open Inference Protocol (KServe v2) datatype <-> numpy dtype (BYTES and BF16 are not served)
KSERVE_DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_KSERVE_NAMES = {dtype: name for name, dtype in KSERVE_DATATYPES.items()}
# ONNX Runtime's NodeArg.type names where they are not "tensor(<numpy name>)"
_ORT_TYPE_NAMES = {"float32": "float", "float64": "double"}
_ORT_TYPE_DTYPES = {ort: dtype for dtype, ort in _ORT_TYPE_NAMES.items()}


def numpy_dtype_of(datatype: str) -> np.dtype:
    """The numpy dtype of an Open Inference Protocol datatype ("FP32" -> float32);
    ValueError, in one line, for datatypes wpk does not serve."""
    try:
        return KSERVE_DATATYPES[datatype]
    except KeyError:
        raise ValueError(f"unsupported datatype {datatype!r} "
                         f"(supported: {', '.join(KSERVE_DATATYPES)})") from None


def kserve_datatype_of(dtype: np.dtype | str) -> str:
    """The Open Inference Protocol datatype of a numpy dtype ("float32" -> "FP32");
    ValueError, in one line, for dtypes it has none for."""
    try:
        return _KSERVE_NAMES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {dtype} has no Open Inference Protocol datatype") from None


def ort_type_of(dtype: np.dtype | str) -> str:
    """ONNX Runtime's type text of a numpy dtype ("float64" -> "tensor(double)")."""
    name = np.dtype(dtype).name
    return f"tensor({_ORT_TYPE_NAMES.get(name, name)})"


def numpy_dtype_of_ort(type_text: str) -> np.dtype:
    """The numpy dtype of ONNX Runtime's type text ("tensor(float)" -> float32); numpy's own
    names inside the parentheses ("tensor(float64)") are read too."""
    inner = type_text[len("tensor("):-1]
    return np.dtype(_ORT_TYPE_DTYPES.get(inner, inner))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, e.g. "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)

    @classmethod
    def of(cls, name: str, shape: Iterable[int], dtype: np.dtype | str) -> "TensorSpec":
        """From any dtype spelling numpy knows (np.float32, "float32", np.dtype)."""
        return cls(name, tuple(shape), np.dtype(dtype).name)

    @classmethod
    def from_kserve(cls, name: str, datatype: str, shape: Iterable[int]) -> "TensorSpec":
        """From Open Inference Protocol metadata ("FP32"); ValueError for unknown datatypes."""
        return cls(name, tuple(shape), numpy_dtype_of(datatype).name)

    @classmethod
    def from_ort(cls, name: str, shape: Iterable[Any], type_text: str) -> "TensorSpec":
        """From ONNX Runtime's NodeArg fields: `shape` holds ints, None or dimension names (a
        free dimension, which becomes -1); `type_text` is "tensor(float)" and the like."""
        return cls(name, tuple(d if isinstance(d, (int, np.integer)) else -1 for d in shape),
                   numpy_dtype_of_ort(type_text).name)

    @cached_property  # (kept beside the fields; not part of equality or the JSON form)
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @cached_property  # servers compare it on every request
    def kserve_datatype(self) -> str:
        """Open Inference Protocol datatype name; ValueError for dtypes it has none for."""
        return kserve_datatype_of(self.numpy_dtype)

    @property
    def ort_type(self) -> str:
        """ONNX Runtime's type string, as InferenceSession.get_inputs()[i].type gives it."""
        return ort_type_of(self.dtype)

    @property
    def type(self) -> str:
        """`ort_type` under ONNX Runtime's NodeArg name for it."""
        return self.ort_type

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.numpy_dtype.itemsize

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether an array of `shape` is this tensor (a dimension below 1 takes any size)."""
        return len(shape) == len(self.shape) and all(
            want < 1 or want == got for want, got in zip(self.shape, shape))

    def concrete_shape(self, n_elements: int) -> tuple[int, ...] | None:
        """The shape holding `n_elements` values, one free dimension solved for; None when
        there is no such shape (or more than one free dimension)."""
        fixed = math.prod(d for d in self.shape if d >= 1)
        free = [i for i, d in enumerate(self.shape) if d < 1]
        if not free:
            return self.shape if fixed == n_elements else None
        if len(free) > 1 or n_elements % fixed:
            return None
        shape = list(self.shape)
        shape[free[0]] = n_elements // fixed
        return tuple(shape)

    # -- JSON: {"name", "shape", "dtype"} in that order -----------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(data["name"], tuple(data["shape"]), data["dtype"])
