"""`TensorSpec`: a named tensor with a dtype and a shape, the one type for what a model, a
slice or a link takes and gives.

`dtype` is a numpy dtype name ("float32"); `kserve_datatype` is the Open Inference Protocol
name ("FP32") and `ort_type` ONNX Runtime's ("tensor(float)"). A dimension below 1 means
"any size" (`fits` accepts every size there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from wpk.records import JsonRecord

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


@dataclass(frozen=True)
class TensorSpec(JsonRecord):
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
        try:
            dtype = KSERVE_DATATYPES[datatype]
        except KeyError:
            raise ValueError(f"unsupported datatype {datatype!r} "
                             f"(supported: {', '.join(KSERVE_DATATYPES)})") from None
        return cls(name, tuple(shape), dtype.name)

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def kserve_datatype(self) -> str:
        """Open Inference Protocol datatype name; KeyError for dtypes it has none for."""
        return _KSERVE_NAMES[self.numpy_dtype]

    @property
    def ort_type(self) -> str:
        """ONNX Runtime's type string, as InferenceSession.get_inputs()[i].type gives it."""
        return f"tensor({_ORT_TYPE_NAMES.get(self.dtype, self.dtype)})"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.numpy_dtype.itemsize

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether an array of `shape` is this tensor (a dimension below 1 takes any size)."""
        return len(shape) == len(self.shape) and all(
            want < 1 or want == got for want, got in zip(self.shape, shape))

    # -- JSON: {"name", "shape", "dtype"} in that order -----------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(data["name"], tuple(data["shape"]), data["dtype"])
