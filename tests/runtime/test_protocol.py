"""The generated protocol module is current and speaks tritonclient's wire format."""
import numpy as np
import pytest

from wpk.runtime import gen_proto
from wpk.runtime import protocol as pb
from wpk.runtime.zero_copy_messages import serialize
from wpk.runtime.infer_messages import build_request, build_response, parse_response


def test_generated_descriptor_is_up_to_date():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) regenerates stubs")
    assert gen_proto.main(["--check"]) == 0


def test_messages_coexist_with_tritonclient_and_share_its_wire_format():
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    image = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    ours = build_request("m", {"image": image}, ["out"], parameters={"wpk_pipeline": True},
                         request_id="7")
    theirs = service_pb2.ModelInferRequest.FromString(serialize(ours))
    assert theirs.model_name == "m" and theirs.id == "7"
    assert theirs.parameters["wpk_pipeline"].bool_param is True
    assert (theirs.inputs[0].name, theirs.inputs[0].datatype, list(theirs.inputs[0].shape)) == \
        ("image", "FP32", [1, 3, 4])
    assert theirs.raw_input_contents[0] == image.tobytes()
    assert theirs.outputs[0].name == "out"
    # and back: a Triton-built response reads as ours
    response = service_pb2.ModelInferResponse(model_name="m")
    response.outputs.add(name="y", datatype="INT64", shape=[2])
    response.raw_output_contents.append(np.array([5, 6], np.int64).tobytes())
    parsed = parse_response(pb.ModelInferResponse.FromString(response.SerializeToString()))
    assert parsed["y"].tolist() == [5, 6]


def test_service_declares_the_protocol_methods():
    assert list(pb.METHODS) == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                "ModelMetadata", "ModelInfer"]
    assert list(pb.STREAM_METHODS) == ["ModelStreamInfer"]  # Triton's extension
    assert pb.method_path("ModelInfer") == "/inference.GRPCInferenceService/ModelInfer"


def test_prebuilt_messages_serialize_exactly_like_protobuf():
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((2, 3)).astype(np.float32).T,  # not contiguous
              "b": np.array([True, False]), "c": np.arange(3, dtype=np.float16),
              "d": np.zeros((0, 4), np.int64), "e": rng.standard_normal(300).astype(np.float64)}
    request = build_request("m", arrays, ["x"], parameters={"k": 1.5}, request_id="9")
    canonical = pb.ModelInferRequest()
    canonical.CopyFrom(request.message)
    canonical.raw_input_contents.extend(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    assert serialize(request) == canonical.SerializeToString()
    for stream in (False, True):
        response = build_response("m", arrays, "9", stream=stream)
        full = pb.ModelInferResponse()
        full.CopyFrom(response.message)
        full.raw_output_contents.extend(np.ascontiguousarray(a).tobytes()
                                        for a in arrays.values())
        expected = (pb.ModelStreamInferResponse(infer_response=full) if stream else full)
        assert serialize(response) == expected.SerializeToString()
        parsed = parse_response(full)
        assert all(np.array_equal(parsed[k], v) for k, v in arrays.items())
