"""`InferenceClient`: a small grpc.aio client for wpk tiers (and any KServe v2 server).

    async with InferenceClient("127.0.0.1:8001") as client:
        outputs = await client.infer("resnet_like", {"image": image}, timeout=5)

Arrays in, arrays out. Failures raise `TierError` with `.code` (a grpc.StatusCode) and
`.details`: UNAVAILABLE / DEADLINE_EXCEEDED are worth retrying, INVALID_ARGUMENT / NOT_FOUND
are not. Inferences are unary ModelInfer calls.

`tensor_link=True` enters a wpk pipeline over the server's tensor link, the binary data plane
the tiers pass tensors on (see next_tier.TcpLink): one frame out, one frame back, large inputs
through a shared-memory lane on loopback; a client on the tier's host or LAN (the MQTT bridge,
a local application) skips one Python gRPC call per request. Where the server has none
(another KServe server, a wpk tier run with `--tls-dir`) or its port cannot be reached, and
for requests that carry `parameters` or a `request_id`, inferences are ModelInfer calls; the
tensor link is looked for again every 30 s. Metadata, health and shared-memory calls are
gRPC calls either way. `stream=True` (gRPC streams) and `shared_memory=True` (inputs in
shared-memory regions registered with the server), which this client no longer uses (the
tensor link, with its lanes, was measured faster than both), mean `tensor_link=True`, with
a warning.
"""
from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import grpc
import numpy as np

from wpk.runtime import protocol as pb
from wpk.runtime.codecs import Codec, Encoder
from wpk.runtime.metrics import TierMetrics
from wpk.runtime.next_tier import GrpcLink, TcpLink
from wpk.runtime.status import TierError
from wpk.tensor_spec import TensorSpec
from wpk.runtime.infer_messages import PIPELINE_PARAM, build_request, parse_response

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
REMOVED = {"stream": "gRPC streams", "shared_memory": "inputs in shared-memory regions"}
# (the client's removed ways in: each now means the tensor link)


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple]:
    """Options for every wpk channel: large messages, quick reconnects after a tier restarts."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0)]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class InferenceClient:
    """One channel to one server. `codec` encodes the tensors this client sends (wpk tiers
    decode them; use "raw", the default, for other servers)."""

    def __init__(self, address: str, *, timeout: float | None = None, codec: str = "raw",
                 stream: bool = False, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 credentials=None, server_name: str | None = None,
                 shared_memory: bool = False, tensor_link: bool = False):
        """`credentials`: grpc.ChannelCredentials for TLS (see wpk.runtime.tls), checking the
        server's certificate against `server_name` when given. `tensor_link`: infer over the
        tensor link (use from one event loop; TLS tiers serve none: their inferences are
        ModelInfer calls). `stream`, `shared_memory`: removed ways in that now mean
        `tensor_link` (one warning each)."""
        for removed, given in (("stream", stream), ("shared_memory", shared_memory)):
            if given:
                warnings.warn(f"InferenceClient({removed}=True): {REMOVED[removed]} were "
                              f"removed from wpk's client; using the tensor link "
                              f"(tensor_link=True; ModelInfer calls where the server has "
                              f"none)", stacklevel=2)
                tensor_link = True
        self.address = address
        self.timeout = timeout
        options = channel_options(max_message_bytes)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self.stub = pb.Stub(self.channel, zero_copy=True)
        self.codec = Codec.parse(codec)
        self.encoder = Encoder(self.codec) if self.codec != Codec() else None
        self.tensor_link = tensor_link
        self.metrics = TierMetrics("client")   # bytes over the tensor link, for the curious
        self._tcp_link: TcpLink | None = None  # made on first use, on the caller's loop

    async def __aenter__(self) -> "InferenceClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        tcp_link, self._tcp_link = self._tcp_link, None
        if tcp_link is not None:
            await tcp_link.close()   # its gRPC fallback closes this client (again, here)
            return
        await self.channel.close()

    async def _call(self, method: str, request, timeout: float | None):
        try:
            return await getattr(self.stub, method)(request, timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as error:
            raise TierError(error.code(), error.details() or "") from None

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def server_live(self, timeout: float | None = None) -> bool:
        response = await self._call("ServerLive", pb.ServerLiveRequest(), timeout)
        return response.live

    async def server_ready(self, timeout: float | None = None) -> bool:
        response = await self._call("ServerReady", pb.ServerReadyRequest(), timeout)
        return response.ready

    async def model_ready(self, model: str, timeout: float | None = None) -> bool:
        response = await self._call("ModelReady", pb.ModelReadyRequest(name=model), timeout)
        return response.ready

    async def model_metadata(self, model: str, timeout: float | None = None) -> ModelMetadata:
        response = await self._call("ModelMetadata", pb.ModelMetadataRequest(name=model), timeout)

        def metas(tensors) -> list[TensorSpec]:
            return [TensorSpec.from_kserve(t.name, t.datatype, t.shape) for t in tensors]

        return ModelMetadata(response.name, response.platform, metas(response.inputs),
                             metas(response.outputs))

    @property
    def transport(self) -> str:
        """"tcp" while inferences go over the tensor link, else "grpc" (or not yet known)."""
        link = self._tcp_link
        return "tcp" if link is not None and link.connection is not None \
            and link.connection.error is None else "grpc"

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray],
                    outputs: Sequence[str] | None = None, *, timeout: float | None = None,
                    parameters: Mapping[str, str | float | bool | int] | None = None,
                    request_id: str = "", pipeline: bool = False) -> dict[str, np.ndarray]:
        """Run `model` on `inputs`; returns the outputs (all, or those named) by name. With
        `pipeline`, a wpk slice model `<name>.<tier>` runs the pipeline from its tier on.
        With `tensor_link`, a request with `parameters` or a `request_id` is a ModelInfer
        call (the tensor link carries neither)."""
        if self.tensor_link and not parameters and not request_id:
            return await self._infer_linked(model, inputs, outputs, timeout, pipeline)
        if pipeline:
            parameters = {**(parameters or {}), PIPELINE_PARAM: True}
        request = build_request(model, inputs, outputs, encoder=self.encoder,
                                parameters=parameters, request_id=request_id)
        response = await self.infer_message(request, timeout=timeout)
        return parse_response(response)

    async def _infer_linked(self, model, inputs, outputs, timeout, pipeline):
        if self._tcp_link is None:
            grpc_link = GrpcLink(self, self.codec, self.metrics, asyncio.get_running_loop())
            self._tcp_link = TcpLink(self.address, grpc_link, self.codec, self.metrics)
        arrays = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        answer = await self._tcp_link.forward(model, arrays, self._timeout(timeout), pipeline)
        unknown = [name for name in outputs or () if name not in answer]
        if unknown:
            raise TierError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"model {model!r} has no output {', '.join(unknown)} "
                            f"(outputs: {', '.join(answer)})")
        return answer if outputs is None else {name: answer[name] for name in outputs}

    async def shared_memory_status(self, name: str = "", timeout: float | None = None) -> dict:
        """Regions registered with the server: name -> (key, offset, byte_size)."""
        response = await self._call("SystemSharedMemoryStatus",
                                    pb.SystemSharedMemoryStatusRequest(name=name), timeout)
        return {r.name: (r.key, r.offset, r.byte_size) for r in response.regions.values()}

    async def infer_message(self, request, *, timeout: float | None = None):
        """Send a prepared ModelInferRequest; returns the ModelInferResponse message."""
        return await self._call("ModelInfer", request, timeout)


InferenceError = TierError   # the name docs/runtime.md and earlier callers import from here
