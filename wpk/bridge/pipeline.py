"""The bridge's view of a deployed pipeline: `infer(model, inputs) -> outputs`.

`Pipeline` is the abstraction the bridge depends on; `KServePipeline` implements it with
`wpk.runtime.client.InferenceClient` over the Open Inference Protocol (KServe v2 gRPC) spoken
by the entry tier of a wpk pipeline, or by any KServe v2 server (Triton, MLServer, ...), and
with `tensor_link=True` sends the inferences over a wpk entry tier's tensor link instead
(`InferenceClient(tensor_link=True)`).
"""
from __future__ import annotations

from typing import Protocol

import grpc
import numpy as np

from wpk.plan import SourceModel
from wpk.runtime.client import InferenceClient
from wpk.runtime.status import TierError


# Worth retrying later: the pipeline (or a tier behind it) is away, restarting or overloaded.
# CANCELLED: a tier that is shutting down cancels the calls it has in flight.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                             grpc.StatusCode.CANCELLED})


class PipelineUnavailable(Exception):
    """The pipeline cannot be reached now; the same request may succeed later."""


class InferenceRejected(Exception):
    """The pipeline refused this request (bad shape, unknown model, ...): do not retry."""


class Pipeline(Protocol):
    async def signature(self, model: str) -> SourceModel: ...

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    async def close(self) -> None: ...


class KServePipeline:
    """The pipeline whose entry tier listens at `address` (`HOST:PORT`).

    Unary ModelInfer calls by default (every KServe v2 server); `stream=True`, gRPC streams
    that wpk's client no longer uses, means `tensor_link=True` (with a warning).
    """

    def __init__(self, address: str, timeout_s: float = 30.0, stream: bool = False,
                 credentials=None, server_name: str | None = None, tensor_link: bool = False):
        """`credentials`/`server_name`: mutual TLS as `wpk.runtime.tls` sets it up.
        `tensor_link`: inferences over the entry tier's tensor link (plain TCP, no TLS);
        metadata still over gRPC."""
        if tensor_link and credentials is not None:
            raise ValueError("the tensor link is plain TCP: no TLS credentials")
        self.address = address
        self.client = InferenceClient(address, timeout=timeout_s, stream=stream,
                                      credentials=credentials, server_name=server_name,
                                      tensor_link=tensor_link)

    @classmethod
    def from_config(cls, config, timeout_s: float = 30.0) -> "KServePipeline":
        """The pipeline a BridgeConfig names, with its TLS settings."""
        credentials = None
        if config.pipeline_tls:
            from wpk.runtime import tls

            credentials = tls.channel_credentials(tls.load(config.pipeline_tls,
                                                           config.pipeline_identity))
        return cls(config.pipeline, timeout_s=timeout_s, stream=config.pipeline_stream,
                   credentials=credentials, server_name=config.pipeline_server_name,
                   tensor_link=config.pipeline_tensor_link)

    async def _call(self, call):
        try:
            return await call
        except TierError as error:  # the client and its stream link raise only this
            detail = f"{self.address}: {error.code.name}: {error.details}"
            if error.code in TRANSIENT_CODES:
                raise PipelineUnavailable(detail) from None
            raise InferenceRejected(detail) from None

    async def signature(self, model: str) -> SourceModel:
        """The model's name and what it takes and gives, from its ModelMetadata."""
        metadata = await self._call(self.client.model_metadata(model))
        return SourceModel(model, inputs=tuple(metadata.inputs), outputs=tuple(metadata.outputs))

    async def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self._call(self.client.infer(model, inputs))

    async def close(self) -> None:
        await self.client.close()
