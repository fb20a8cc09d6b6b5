"""The activations generated kernels fuse: what ONNX Runtime's NCHWc Conv attributes map to,
and what is refused (so that a site with an activation we do not generate is left alone)."""
import pytest

from wpk.optimizer import activations


def test_onnxruntime_attributes_map_to_kernel_activations():
    assert activations.from_ort_attributes({}) == ""
    assert activations.from_ort_attributes({"activation": "Relu"}) == "relu"
    relu6 = activations.from_ort_attributes({"activation": "Clip",
                                             "activation_params": [0.0, 6.0]})
    assert relu6 == "clip:0.0:6.0" and activations.clip_bounds(relu6) == (0.0, 6.0)
    for unsupported in ({"activation": "Sigmoid"}, {"activation": "LeakyRelu",
                                                    "activation_params": [0.1]},
                        {"activation": "Clip", "activation_params": [0.0, float("inf")]},
                        {"activation": "Clip", "activation_params": [6.0, 0.0]}):
        assert activations.from_ort_attributes(unsupported) is None


def test_older_boolean_parameters_still_read():
    assert activations.normalize(True) == "relu" and activations.normalize(False) == ""
    assert "_mm512_min_ps" in activations.avx512("clip:-1.0:1.0")
    assert activations.avx512("") == ""
    with pytest.raises(ValueError):
        activations.normalize("gelu")
