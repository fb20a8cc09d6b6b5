"""Model signatures (from the pipeline's ModelMetadata) and fitting payload arrays to them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wpk.tensor_spec import KSERVE_DATATYPES

# KServe v2 / Open Inference Protocol datatype names, as the tier servers use them.
KSERVE_TO_NUMPY = KSERVE_DATATYPES


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, KServe datatype, shape (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return KSERVE_TO_NUMPY[self.datatype]

    def fit(self, array: np.ndarray) -> np.ndarray:
        """Cast and reshape `array` to this spec, or raise ValueError saying why not.

        A flat array (or any array with the right number of elements) is reshaped when the spec
        has at most one free dimension: sensors often send a flat list of readings.
        """
        if array.dtype != self.dtype:
            if array.dtype.kind not in "biuf":   # strings, objects; complex would lose a part
                raise ValueError(f"input {self.name!r}: expected {self.datatype} numbers, "
                                 f"got {array.dtype.name} values")
            array = array.astype(self.dtype)
        if self._accepts(array.shape):
            return np.ascontiguousarray(array)
        shape = self.concrete_shape(array.size)
        if shape is None:
            raise ValueError(f"input {self.name!r}: shape {list(array.shape)} does not fit "
                             f"{list(self.shape)}")
        return np.ascontiguousarray(array.reshape(shape))

    def _accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            want < 0 or want == got for want, got in zip(self.shape, shape))

    def concrete_shape(self, n_elements: int) -> tuple[int, ...] | None:
        """The shape holding `n_elements` (one free dimension is solved for), or None."""
        fixed = int(np.prod([d for d in self.shape if d >= 0])) if self.shape else 1
        free = [i for i, d in enumerate(self.shape) if d < 0]
        if not free:
            return self.shape if fixed == n_elements else None
        if len(free) > 1 or fixed == 0 or n_elements % fixed:
            return None
        shape = list(self.shape)
        shape[free[0]] = n_elements // fixed
        return tuple(shape)


@dataclass(frozen=True)
class ModelSignature:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise ValueError(f"model {self.name!r} has no input {name!r} "
                         f"(inputs: {', '.join(s.name for s in self.inputs)})")

    def single_input(self, format_name: str) -> TensorSpec:
        if len(self.inputs) != 1:
            raise ValueError(f"format {format_name} carries one tensor but model {self.name!r} "
                             f"has {len(self.inputs)} inputs: use json or npz")
        return self.inputs[0]
