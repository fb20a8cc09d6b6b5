"""Open Inference Protocol messages and the service's method table.

Messages of Triton's shared-memory extension are here too (`SHARED_MEMORY_METHODS`), and the
request and tensor parameters (`map<string, InferParameter>`) to and from Python values.
Message classes are built from the generated descriptor (`_open_inference_desc`, see
`gen_proto`) in a private descriptor pool, so this module coexists with tritonclient's own
`inference.*` classes in one process. The wire format is the specification's.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from wpk.runtime._open_inference_desc import SERIALIZED
from wpk.runtime.zero_copy_messages import request_parser, response_parser, serialize

SERVICE = "inference.GRPCInferenceService"

_pool = descriptor_pool.DescriptorPool()
_file = _pool.Add(descriptor_pb2.FileDescriptorProto.FromString(SERIALIZED))


def _message(name: str) -> type:
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"inference.{name}"))


ServerLiveRequest = _message("ServerLiveRequest")
ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyRequest = _message("ServerReadyRequest")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyRequest = _message("ModelReadyRequest")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataRequest = _message("ServerMetadataRequest")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataRequest = _message("ModelMetadataRequest")
ModelMetadataResponse = _message("ModelMetadataResponse")
ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")
ModelStreamInferResponse = _message("ModelStreamInferResponse")
InferParameter = _message("InferParameter")
InferTensorContents = _message("InferTensorContents")
SystemSharedMemoryStatusRequest = _message("SystemSharedMemoryStatusRequest")
SystemSharedMemoryStatusResponse = _message("SystemSharedMemoryStatusResponse")
SystemSharedMemoryRegisterRequest = _message("SystemSharedMemoryRegisterRequest")
SystemSharedMemoryRegisterResponse = _message("SystemSharedMemoryRegisterResponse")
SystemSharedMemoryUnregisterRequest = _message("SystemSharedMemoryUnregisterRequest")
SystemSharedMemoryUnregisterResponse = _message("SystemSharedMemoryUnregisterResponse")
CudaSharedMemoryStatusRequest = _message("CudaSharedMemoryStatusRequest")
CudaSharedMemoryStatusResponse = _message("CudaSharedMemoryStatusResponse")
CudaSharedMemoryRegisterRequest = _message("CudaSharedMemoryRegisterRequest")
CudaSharedMemoryRegisterResponse = _message("CudaSharedMemoryRegisterResponse")
CudaSharedMemoryUnregisterRequest = _message("CudaSharedMemoryUnregisterRequest")
CudaSharedMemoryUnregisterResponse = _message("CudaSharedMemoryUnregisterResponse")

# method name -> (request class, response class), in the service's order
METHODS: dict[str, tuple[type, type]] = {
    "ServerLive": (ServerLiveRequest, ServerLiveResponse),
    "ServerReady": (ServerReadyRequest, ServerReadyResponse),
    "ModelReady": (ModelReadyRequest, ModelReadyResponse),
    "ServerMetadata": (ServerMetadataRequest, ServerMetadataResponse),
    "ModelMetadata": (ModelMetadataRequest, ModelMetadataResponse),
    "ModelInfer": (ModelInferRequest, ModelInferResponse),
}
# bidirectional streams (Triton's extension)
STREAM_METHODS: dict[str, tuple[type, type]] = {
    "ModelStreamInfer": (ModelInferRequest, ModelStreamInferResponse),
}

# Triton's shared-memory extension (unary; served when the servicer has the method)
SHARED_MEMORY_METHODS: dict[str, tuple[type, type]] = {
    "SystemSharedMemoryStatus": (SystemSharedMemoryStatusRequest,
                                 SystemSharedMemoryStatusResponse),
    "SystemSharedMemoryRegister": (SystemSharedMemoryRegisterRequest,
                                   SystemSharedMemoryRegisterResponse),
    "SystemSharedMemoryUnregister": (SystemSharedMemoryUnregisterRequest,
                                     SystemSharedMemoryUnregisterResponse),
    "CudaSharedMemoryStatus": (CudaSharedMemoryStatusRequest, CudaSharedMemoryStatusResponse),
    "CudaSharedMemoryRegister": (CudaSharedMemoryRegisterRequest,
                                 CudaSharedMemoryRegisterResponse),
    "CudaSharedMemoryUnregister": (CudaSharedMemoryUnregisterRequest,
                                   CudaSharedMemoryUnregisterResponse),
}

# Checked at import: the generated descriptor declares exactly these methods.
assert [m.name for m in _pool.FindServiceByName(SERVICE).methods] == \
    list(METHODS) + list(STREAM_METHODS) + list(SHARED_MEMORY_METHODS)


def set_parameter(target, key: str, value: str | float | bool | int) -> None:
    """Store a Python value in a protobuf `map<string, InferParameter>`."""
    param = target[key]
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def parameter_value(param):
    choice = param.WhichOneof("parameter_choice")
    return getattr(param, choice) if choice else None


def method_path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def _deserializer(cls, zero_copy: bool):
    """`cls.FromString`, or with `zero_copy` for the inference messages a parser that leaves
    their raw tensor contents in the received bytes (see zero_copy_messages)."""
    if zero_copy and cls is ModelInferRequest:
        return request_parser(cls)
    if zero_copy and cls is ModelInferResponse:
        return response_parser(cls)
    return cls.FromString


_TABLES = ((METHODS, "unary_unary"), (STREAM_METHODS, "stream_stream"),
           (SHARED_MEMORY_METHODS, "unary_unary"))   # (methods, grpc's kind of call)


def generic_handler(servicer: object):
    """A grpc handler routing each method to the coroutine `servicer.<Method>(request, ctx)`
    (stream and shared-memory methods, when the servicer has them; a stream method gets
    the request iterator). Inference requests arrive as `zero_copy_messages.Received`
    messages (raw contents not copied)."""
    import grpc

    handlers = {}
    for table, kind in _TABLES:
        for name, (request, _) in table.items():
            if table is METHODS or hasattr(servicer, name):
                handlers[name] = getattr(grpc, f"{kind}_rpc_method_handler")(
                    getattr(servicer, name), request_deserializer=_deserializer(request, True),
                    response_serializer=serialize)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class Stub:
    """Client-side callables for each method, on a grpc (aio or sync) channel. With
    `zero_copy`, inference answers arrive as `zero_copy_messages.Received` messages (raw
    contents left in the received bytes, as memoryviews) instead of plain protobuf messages."""

    def __init__(self, channel, zero_copy: bool = False):
        for table, kind in _TABLES:
            for name, (_, response) in table.items():
                setattr(self, name, getattr(channel, kind)(
                    method_path(name), request_serializer=serialize,
                    response_deserializer=_deserializer(response, zero_copy)))
