"""Zero-copy parsing of received inference messages reads exactly what protobuf reads."""
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from wpk.runtime import protocol as pb
from wpk.runtime.zero_copy_messages import Received, request_parser, response_parser
from wpk.runtime.infer_messages import build_request, build_response, parse_response, payload_bytes


def _same_fields(received, canonical, raw_name: str) -> None:
    stripped = type(canonical)()
    stripped.CopyFrom(canonical)
    stripped.ClearField(raw_name)
    assert received.message == stripped
    assert [bytes(b) for b in getattr(received, raw_name)] == list(getattr(canonical, raw_name))


def test_request_raw_contents_are_views_of_the_received_bytes():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(0, np.int64),
              "c": np.array([True, False])}
    data = build_request("m", arrays, ["y"], parameters={"wpk_pipeline": True, "k": 2.5},
                         request_id="7").serialize()
    received = request_parser(pb.ModelInferRequest)(data)
    assert type(received) is Received and payload_bytes(received) == len(data)
    _same_fields(received, pb.ModelInferRequest.FromString(data), "raw_input_contents")
    assert all(isinstance(b, memoryview) and b.obj is data for b in received.raw_input_contents)
    assert received.parameters["k"].double_param == 2.5 and received.id == "7"
    received.id = "8"  # attributes are the message's
    assert received.message.id == "8"


def test_fields_in_any_order_and_typed_contents_parse_like_protobuf():
    request = pb.ModelInferRequest(model_name="m", id="1")
    request.raw_input_contents.append(b"\1\2\3\4")
    request.inputs.add(name="x", datatype="INT32", shape=[1])
    request.inputs.add(name="t", datatype="INT64", shape=[2]).contents.int64_contents.extend([1, 2])
    request.parameters["z"].int64_param = -5
    # raw contents first, then the other fields, then raw contents again
    data = request.SerializeToString() + b"\x3a\x02\x05\x06" + b"\x0a\x01n"
    received = request_parser(pb.ModelInferRequest)(data)
    _same_fields(received, pb.ModelInferRequest.FromString(data), "raw_input_contents")
    assert received.model_name == "n"  # the last value of a scalar field wins, as in protobuf


def test_malformed_bytes_get_protobufs_own_error():
    data = build_request("m", {"a": np.ones(4, np.float32)}).serialize()
    with pytest.raises(DecodeError):
        request_parser(pb.ModelInferRequest)(data[:-3])  # truncated inside raw contents
    group = b"\x0b\x0c"  # wire types the parser does not read itself: protobuf decides
    assert request_parser(pb.ModelInferRequest)(group) == pb.ModelInferRequest.FromString(group)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_parse_in_place(stream):
    arrays = {"y": np.arange(5, dtype=np.float64), "z": np.array([[1, 2]], np.uint8)}
    data = build_response("m", arrays, "3", stream=stream).serialize()
    if stream:   # a stream answer wraps the response; protobuf reads the wrapper
        data = pb.ModelStreamInferResponse.FromString(data).infer_response.SerializeToString()
    response = response_parser(pb.ModelInferResponse)(data)
    canonical = pb.ModelInferResponse.FromString(data)
    _same_fields(response, canonical, "raw_output_contents")
    parsed = parse_response(response)
    assert {k: v.tolist() for k, v in parsed.items()} == {k: v.tolist() for k, v in arrays.items()}
