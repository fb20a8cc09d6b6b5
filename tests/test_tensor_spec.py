"""wpk.tensor_spec.TensorSpec: one named tensor type, in the spellings plans, the Open
Inference Protocol and ONNX Runtime use."""
import numpy as np
import pytest

from wpk.tensor_spec import (KSERVE_DATATYPES, TensorSpec, kserve_datatype_of,
                             numpy_dtype_of_ort, ort_type_of)


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
    assert TensorSpec("x", (1,), dtype).ort_type == ort == ort_type_of(dtype)
    assert numpy_dtype_of_ort(ort) == np.dtype(dtype)


def test_numpy_names_in_ort_type_text_are_read_too():
    assert numpy_dtype_of_ort("tensor(float64)") == np.dtype(np.float64)


def test_a_dtype_without_kserve_datatype_is_one_line():
    with pytest.raises(ValueError, match="^dtype complex64 has no Open Inference Protocol "
                                         "datatype$"):
        kserve_datatype_of("complex64")
    with pytest.raises(ValueError, match="has no Open Inference Protocol datatype"):
        TensorSpec("x", (1,), "complex64").kserve_datatype


def test_derived_spellings_stay_out_of_equality_and_json():
    spec = TensorSpec("x", (2,), "float32")
    assert spec.kserve_datatype == "FP32" and spec.numpy_dtype == np.float32
    same = TensorSpec("x", (2,), "float32")
    assert spec == same and hash(spec) == hash(same)
    assert spec.to_json() == {"name": "x", "shape": [2], "dtype": "float32"}


def test_free_dimensions_fit_any_size_and_json_keeps_its_order():
    spec = TensorSpec("x", (-1, 3), "float32")
    assert spec.fits((5, 3)) and not spec.fits((5, 4)) and not spec.fits((3,))
    assert list(spec.to_json()) == ["name", "shape", "dtype"]
    assert TensorSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("shape, count, concrete", [((-1, 4), 8, (2, 4)), ((-1, 4), 6, None),
                                                    ((2, 4), 8, (2, 4)), ((2, 4), 7, None),
                                                    ((-1, -1), 4, None), ((), 1, ()),
                                                    ((0, 3), 9, (3, 3))])
def test_concrete_shape_solves_one_free_dimension(shape, count, concrete):
    assert TensorSpec("x", shape, "float32").concrete_shape(count) == concrete


def test_from_ort_reads_nodearg_fields_free_dimensions_as_minus_one():
    spec = TensorSpec.from_ort("x", ["batch", None, 3, 0], "tensor(float)")
    assert spec == TensorSpec("x", (-1, -1, 3, 0), "float32")
    assert spec.type == spec.ort_type == "tensor(float)"
    assert spec.fits((5, 7, 3, 2)) and not spec.fits((5, 7, 4, 2))


def test_from_ort_reads_an_ort_session_s_inputs():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["out"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 4])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    arg = session.get_inputs()[0]
    assert TensorSpec.from_ort(arg.name, arg.shape, arg.type) == TensorSpec("ids", (-1, 4), "int64")
