"""wpk.tensor_spec.TensorSpec: one named tensor type, in the spellings plans, the Open
Inference Protocol and ONNX Runtime use."""
import numpy as np
import pytest

from wpk.tensor_spec import KSERVE_DATATYPES, TensorSpec


def test_dtype_spellings_become_numpy_names():
    assert TensorSpec.of("x", [1, 2], np.float32) == TensorSpec("x", (1, 2), "float32")
    assert TensorSpec("x", [3], np.dtype("int64")).dtype == "int64"
    with pytest.raises(TypeError):
        TensorSpec("x", (1,), "floaty")


@pytest.mark.parametrize("datatype", sorted(KSERVE_DATATYPES))
def test_kserve_datatypes_round_trip(datatype):
    assert TensorSpec.from_kserve("x", datatype, (2,)).kserve_datatype == datatype


def test_an_unknown_kserve_datatype_is_one_line():
    with pytest.raises(ValueError, match="^unsupported datatype 'BYTES' \\(supported: BOOL"):
        TensorSpec.from_kserve("x", "BYTES", (1,))


@pytest.mark.parametrize("dtype, ort", [("float32", "tensor(float)"),
                                        ("float64", "tensor(double)"),
                                        ("float16", "tensor(float16)"),
                                        ("int64", "tensor(int64)"), ("bool", "tensor(bool)")])
def test_ort_type_names(dtype, ort):
    assert TensorSpec("x", (1,), dtype).ort_type == ort


def test_free_dimensions_fit_any_size_and_json_keeps_its_order():
    spec = TensorSpec("x", (-1, 3), "float32")
    assert spec.fits((5, 3)) and not spec.fits((5, 4)) and not spec.fits((3,))
    assert list(spec.to_json()) == ["name", "shape", "dtype"]
    assert TensorSpec.from_json(spec.to_json()) == spec
