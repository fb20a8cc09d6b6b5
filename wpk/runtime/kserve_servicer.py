"""The KServe v2 (Open Inference Protocol) gRPC servicer of one tier: a thin adapter over its
`TierCore`. Messages in, arrays to the core, arrays out; a `TierError` becomes the call's
gRPC status here (ModelInfer) or the answer's error (ModelStreamInfer, which carries the code
as `wpk_status`). Triton's system shared-memory extension is served beside it (see
shared_memory_rpcs); ServerMetadata names the tensor link's port (see next_tier).
"""
from __future__ import annotations

import asyncio
import time

import grpc

from wpk import __version__
from wpk.runtime import protocol as pb
from wpk.runtime.link_server import LinkServer
from wpk.runtime.shared_memory import EXTENSION as SHM_EXTENSION
from wpk.runtime.shared_memory import SharedMemoryRegistry, uses_shared_memory
from wpk.runtime.shared_memory_rpcs import SharedMemoryRpcs
from wpk.runtime.status import TierError, failure
from wpk.runtime.tensor_link import EXTENSION_PREFIX, LANE_EXTENSION
from wpk.runtime.tensors import TensorError
from wpk.runtime.tier_core import TierCore
from wpk.runtime.infer_messages import (PIPELINE_PARAM, STATUS_PARAM, TIMEOUT_PARAM,
                                        build_response, parameter_value, parse_inputs,
                                        payload_bytes, requested_outputs, set_parameter)


class KServeServicer(SharedMemoryRpcs):
    """`shared_memory`: the registry of Triton's extension (None: not served);
    `link_server`: this tier's tensor link, advertised in ServerMetadata (None: none)."""

    def __init__(self, core: TierCore, shared_memory: SharedMemoryRegistry | None,
                 link_server: LinkServer | None):
        self.core = core
        self.shared_memory = shared_memory
        self.link_server = link_server
        self.where = core.where

    # -- health and metadata -----------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.core.serving)

    async def ModelReady(self, request, context):
        ready = self.core.serving and request.name in self.core.models
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request, context):
        extensions = [SHM_EXTENSION] if self.shared_memory is not None else []
        if self.link_server:
            extensions.append(f"{EXTENSION_PREFIX}{self.link_server.port}")
            if self.link_server.lanes:
                extensions.append(LANE_EXTENSION)
        return pb.ServerMetadataResponse(name=f"wpk ({self.core.name}.{self.core.tier.name})",
                                         version=__version__, extensions=extensions)

    async def ModelMetadata(self, request, context):
        try:
            model = self.core.model(request.name)
        except TierError as error:
            await context.abort(error.code, error.details)
        response = pb.ModelMetadataResponse(name=model.name, versions=["1"],
                                            platform="onnxruntime_onnx")
        for target, metas in ((response.inputs, model.inputs), (response.outputs, model.outputs)):
            for meta in metas.values():
                target.add(name=meta.name, datatype=meta.kserve_datatype, shape=meta.shape)
        return response

    # -- inference ---------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request, context.time_remaining())
        except TierError as failed:  # the gRPC edge: a TierError becomes the call's status
            await context.abort(failed.code, failed.details)

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming inference (tritonclient's `start_stream`): each request runs
        concurrently; answers carry its id and are written in the order they are ready, by
        one writer (grpc.aio allows one write in flight per stream), so that no request's
        task waits for the writes of others."""
        running: set[asyncio.Task] = set()
        answers: asyncio.Queue = asyncio.Queue()

        async def write_answers() -> None:
            try:
                while (message := await answers.get()) is not None:
                    await context.write(message)
            except Exception:   # the caller has gone: nobody is left to answer
                pass

        async def answer(request) -> None:
            try:
                message = await self._infer(request, stream=True)
            except TierError as failed:  # every request gets an answer, whatever went wrong
                message = pb.ModelStreamInferResponse(error_message=failed.details)
                message.infer_response.id = request.id
                message.infer_response.model_name = request.model_name
                set_parameter(message.infer_response.parameters, STATUS_PARAM,
                              failed.code.value[0])
            answers.put_nowait(message)

        writer = asyncio.ensure_future(write_answers())
        try:
            async for request in request_iterator:
                task = asyncio.ensure_future(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            answers.put_nowait(None)
            await writer
        finally:
            for task in running:
                task.cancel()
            writer.cancel()

    async def _infer(self, request, remaining: float | None = None, stream: bool = False):
        """One inference, counted in the metrics; any failure is raised as the TierError the
        caller gets (status.failure). `remaining`: seconds left of the caller's deadline
        (None: none; on a stream the request's `wpk_timeout_ms` says)."""
        core, model_name = self.core, request.model_name
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            if stream:
                param = request.parameters.get(TIMEOUT_PARAM)
                remaining = parameter_value(param) / 1000.0 if param is not None else None
            deadline = None if remaining is None else time.monotonic() + remaining
            core.admit()
            try:
                core.metrics.add_bytes("in", payload_bytes(request))
                model = core.model(model_name)
                param = request.parameters.get(PIPELINE_PARAM)
                pipeline = model.pipeline or bool(param is not None and parameter_value(param))
                arrays = parse_inputs(request, model_name, model.inputs, self.shared_memory)
                targets = self._output_targets(request, model_name) if request.outputs else {}
                produced = await core.infer(model, arrays, deadline, pipeline)
                names = requested_outputs(request, model_name, list(produced))
                in_shared_memory = {}
                if targets:
                    self.shared_memory.write_outputs(model_name, targets, produced)
                    in_shared_memory = {o.name: o.parameters for o in request.outputs
                                        if o.name in targets}
                response = build_response(model_name, {n: produced[n] for n in names},
                                          request.id, stream=stream,
                                          in_shared_memory=in_shared_memory)
                core.metrics.add_bytes("out", payload_bytes(response))
                return response
            finally:
                core.in_flight -= 1
        except Exception as error:
            failed = failure(error, self.where)
            code = failed.code
            raise failed from None
        finally:
            core.metrics.observe(model_name, code.name, time.perf_counter() - started)

    def _output_targets(self, request, model_name: str) -> dict:
        """Requested outputs to write into shared memory (see shared_memory)."""
        if self.shared_memory is not None:
            return self.shared_memory.output_targets(request, model_name)
        if any(uses_shared_memory(o.parameters) for o in request.outputs):
            raise TensorError(f"model {model_name!r}: an output names a shared memory region, "
                              f"but shared memory is disabled on this server")
        return {}
