"""The bridge's view of a deployed pipeline: `infer(model, inputs) -> outputs`.

`Pipeline` is the abstraction the bridge depends on; `KServePipeline` implements it over the
Open Inference Protocol (KServe v2 gRPC) spoken by the first tier of a wpk pipeline (or any
KServe v2 server: Triton, MLServer, ...). Tensors travel as raw little-endian contents.
"""
from __future__ import annotations

from typing import Protocol

import grpc
import numpy as np

from .formats import little_endian_bytes
from .tensors import KSERVE_TO_NUMPY, ModelSignature, TensorSpec, kserve_dtype

MAX_MESSAGE_BYTES = 1 << 30

# Worth retrying later: the pipeline (or a tier behind it) is away or overloaded.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})


class PipelineUnavailable(Exception):
    """The pipeline cannot be reached now; the same request may succeed later."""


class InferenceRejected(Exception):
    """The pipeline refused this request (bad shape, unknown model, ...): do not retry."""


class Pipeline(Protocol):
    async def signature(self, model: str) -> ModelSignature: ...

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    async def close(self) -> None: ...


def _services():
    # The v2 stubs shipped by tritonclient (a superset of KServe v2); swap for wpk.runtime's
    # own generated stubs once they are on main (same package `inference`, same messages).
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    return service_pb2, service_pb2_grpc


class KServePipeline:
    """Client of a KServe v2 gRPC endpoint at `address` (`HOST:PORT`)."""

    def __init__(self, address: str, timeout_s: float = 30.0):
        self.address = address
        self.timeout_s = timeout_s
        self._pb, stubs = _services()
        self._channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Reconnect quickly after a tier restart (gRPC's default backoff grows to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ])
        self._stub = stubs.GRPCInferenceServiceStub(self._channel)
        self._signatures: dict[str, ModelSignature] = {}

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            detail = f"{self.address}: {error.code().name}: {error.details()}"
            if error.code() in TRANSIENT_CODES:
                raise PipelineUnavailable(detail) from None
            raise InferenceRejected(detail) from None

    async def signature(self, model: str) -> ModelSignature:
        if model not in self._signatures:
            reply = await self._call(self._stub.ModelMetadata,
                                     self._pb.ModelMetadataRequest(name=model))

            def specs(tensors) -> tuple[TensorSpec, ...]:
                return tuple(TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape))
                             for t in tensors)
            self._signatures[model] = ModelSignature(model, specs(reply.inputs),
                                                     specs(reply.outputs))
        return self._signatures[model]

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._pb.ModelInferRequest(model_name=model)
        for name, array in inputs.items():
            request.inputs.add(name=name, datatype=kserve_dtype(array), shape=array.shape)
            request.raw_input_contents.append(little_endian_bytes(array))
        reply = await self._call(self._stub.ModelInfer, request)
        return decode_outputs(reply)

    async def close(self) -> None:
        await self._channel.close()


def decode_outputs(reply) -> dict[str, np.ndarray]:
    """Outputs of a ModelInferResponse; raw contents (what every fast server sends)."""
    outputs = {}
    for i, tensor in enumerate(reply.outputs):
        dtype = KSERVE_TO_NUMPY.get(tensor.datatype)
        if dtype is None:
            raise InferenceRejected(f"output {tensor.name!r}: unsupported datatype "
                                    f"{tensor.datatype}")
        if i < len(reply.raw_output_contents):
            array = np.frombuffer(reply.raw_output_contents[i], dtype=dtype.newbyteorder("<"))
        else:  # typed contents, e.g. fp32_contents
            wide = dtype.itemsize == 8
            field = {"f": "fp64_contents" if wide else "fp32_contents", "b": "bool_contents",
                     "u": "uint64_contents" if wide else "uint_contents",
                     "i": "int64_contents" if wide else "int_contents"}[dtype.kind]
            array = np.asarray(getattr(tensor.contents, field), dtype=dtype)
        outputs[tensor.name] = array.astype(dtype, copy=False).reshape(tuple(tensor.shape))
    return outputs
