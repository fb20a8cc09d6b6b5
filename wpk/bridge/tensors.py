"""A model's inputs, as the pipeline's ModelMetadata gives them (a `wpk.plan.SourceModel` of
`wpk.tensor_spec.TensorSpec`s), and fitting payload arrays to them."""
from __future__ import annotations

import numpy as np

from wpk.plan import SourceModel
from wpk.tensor_spec import TensorSpec


def model_input(model: SourceModel, name: str) -> TensorSpec:
    """The input called `name`, or ValueError listing the inputs there are."""
    for spec in model.inputs:
        if spec.name == name:
            return spec
    raise ValueError(f"model {model.name!r} has no input {name!r} "
                     f"(inputs: {', '.join(s.name for s in model.inputs)})")


def single_input(model: SourceModel, format_name: str) -> TensorSpec:
    """The model's only input, for formats that carry one tensor; else ValueError."""
    if len(model.inputs) != 1:
        raise ValueError(f"format {format_name} carries one tensor but model {model.name!r} "
                         f"has {len(model.inputs)} inputs: use json or npz")
    return model.inputs[0]


def fit(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """Cast and reshape `array` to `spec`, or raise ValueError saying why not.

    A flat array (or any array with the right number of elements) is reshaped when the spec
    has at most one free dimension: sensors often send a flat list of readings.
    """
    if array.dtype != spec.numpy_dtype:
        if array.dtype.kind not in "biuf":   # strings, objects; complex would lose a part
            raise ValueError(f"input {spec.name!r}: expected {spec.kserve_datatype} numbers, "
                             f"got {array.dtype.name} values")
        array = array.astype(spec.numpy_dtype)
    if spec.fits(array.shape):
        return np.ascontiguousarray(array)
    shape = spec.concrete_shape(array.size)
    if shape is None:
        raise ValueError(f"input {spec.name!r}: shape {list(array.shape)} does not fit "
                         f"{list(spec.shape)}")
    return np.ascontiguousarray(array.reshape(shape))
