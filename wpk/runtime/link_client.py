"""`LinkClient`: a client that enters a wpk pipeline over the entry tier's tensor link.

    async with LinkClient("127.0.0.1:8001") as client:
        outputs = await client.infer("resnet_like", {"image": image}, timeout=5)

The tensor link (tensor_link) is the binary data plane the tiers pass tensors on; every wpk
tier run with the default `--link tcp` serves it next to its KServe endpoint, the entry tier
included, and names its port in ServerMetadata. A client on the same host or LAN (the MQTT
bridge on the device, a local application, a benchmark) skips one Python gRPC call per
request this way: one frame out, one frame back, large inputs through a shared-memory lane
on loopback. Where the server has no tensor link (another KServe server, a wpk tier run with
`--link grpc`, or with `--tls-dir`: give `credentials`) or its port cannot be reached,
requests go over one ModelStreamInfer stream instead, and the tensor link is looked for
again every 30 s.

Answers are what ModelInfer gives: the entry tier's pipeline model answers the model's
outputs, a slice model `<name>.<tier>` its slice's outputs; with `pipeline=True` a slice
model runs the pipeline from its tier to the end (the `wpk_pipeline` parameter over gRPC).
Failures raise `TierError`, as InferenceClient's do. Metadata, health and shared-memory
calls are KServe calls: use `client.grpc`, an InferenceClient on the same address.
"""
from __future__ import annotations

import asyncio
from typing import Mapping, Sequence

import grpc
import numpy as np

from wpk.runtime.client import DEFAULT_MAX_MESSAGE_BYTES, InferenceClient
from wpk.runtime.codecs import Codec
from wpk.runtime.status import TierError
from wpk.runtime.metrics import TierMetrics
from wpk.runtime.next_tier import GrpcLink, TcpLink


class LinkClient:
    """The pipeline behind the tier at `address` (its gRPC `HOST:PORT`). `codec` encodes the
    tensors this client sends (wpk tiers decode them). Use from one event loop."""

    def __init__(self, address: str, *, timeout: float | None = None, codec: str = "raw",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, credentials=None,
                 server_name: str | None = None):
        """`credentials`/`server_name`: TLS for the gRPC calls, as InferenceClient takes
        them (TLS tiers serve no tensor link: requests then go over the stream)."""
        self.address = address
        self.timeout = timeout
        self.codec = Codec.parse(codec)
        self.grpc = InferenceClient(address, timeout=timeout, stream=True,
                                    max_message_bytes=max_message_bytes,
                                    credentials=credentials, server_name=server_name)
        self.metrics = TierMetrics("client")   # bytes sent and received, for the curious
        self._link: TcpLink | None = None      # made on first use, on the caller's loop

    async def __aenter__(self) -> "LinkClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def transport(self) -> str:
        """"tcp" while requests go over the tensor link, "grpc" otherwise (or not yet known)."""
        link = self._link
        return "tcp" if link is not None and link.connection is not None \
            and link.connection.error is None else "grpc"

    def _tcp_link(self) -> TcpLink:
        if self._link is None:
            loop = asyncio.get_running_loop()
            self._link = TcpLink(self.address, GrpcLink(self.grpc, self.codec, self.metrics, loop),
                                 self.codec, self.metrics, on_loop=True)
        return self._link

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray],
                    outputs: Sequence[str] | None = None, *, timeout: float | None = None,
                    pipeline: bool = False) -> dict[str, np.ndarray]:
        """Run `model` on `inputs` (with `pipeline`, a slice model runs the pipeline from
        its tier); returns the outputs (all, or those named) by name."""
        arrays = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
        answer = await self._tcp_link().forward(
            model, arrays, self.timeout if timeout is None else timeout, pipeline=pipeline)
        if outputs is None:
            return answer
        unknown = [name for name in outputs if name not in answer]
        if unknown:
            raise TierError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"model {model!r} has no output {', '.join(unknown)} "
                                 f"(outputs: {', '.join(answer)})")
        return {name: answer[name] for name in outputs}

    async def close(self) -> None:
        if self._link is not None:
            await self._link.close()   # closes self.grpc too
        else:
            await self.grpc.close()
