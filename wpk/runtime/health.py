"""The standard gRPC health service (`grpc.health.v1.Health/Check`), which Kubernetes' gRPC
probes, grpc_health_probe and load balancers call.

Messages are built from a descriptor made in code (two tiny messages), in a private pool, so
no generated module or extra package is needed. `Check` answers SERVING for the whole server
(service "") and for `inference.GRPCInferenceService` while `is_serving()` is true, and
NOT_FOUND for any other service, as the health-checking protocol specifies. `Watch` is not
offered (UNIMPLEMENTED), which the protocol allows.
"""
from __future__ import annotations

from typing import Callable

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "grpc.health.v1.Health"
UNKNOWN, SERVING, NOT_SERVING = 0, 1, 2


def _descriptor() -> descriptor_pb2.FileDescriptorProto:
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="wpk/grpc_health_v1.proto",
                                               package="grpc.health.v1", syntax="proto3")
    request = proto.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=field.TYPE_STRING,
                      label=field.LABEL_OPTIONAL)
    response = proto.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for name, number in (("UNKNOWN", 0), ("SERVING", 1), ("NOT_SERVING", 2),
                         ("SERVICE_UNKNOWN", 3)):
        status.value.add(name=name, number=number)
    response.field.add(name="status", number=1, type=field.TYPE_ENUM,
                       type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
                       label=field.LABEL_OPTIONAL)
    return proto


_pool = descriptor_pool.DescriptorPool()
_pool.Add(_descriptor())
HealthCheckRequest = message_factory.GetMessageClass(
    _pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
HealthCheckResponse = message_factory.GetMessageClass(
    _pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse"))


def health_handler(is_serving: Callable[[], bool] = lambda: True,
                   services: tuple[str, ...] = ("", "inference.GRPCInferenceService")):
    """A generic handler to add to a grpc.aio server next to the inference service."""
    import grpc

    async def check(request, context):
        if request.service not in services:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown service {request.service!r}")
        return HealthCheckResponse(status=SERVING if is_serving() else NOT_SERVING)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Check": grpc.unary_unary_rpc_method_handler(
            check, request_deserializer=HealthCheckRequest.FromString,
            response_serializer=HealthCheckResponse.SerializeToString)})
