"""The RPCs of Triton's system shared-memory extension, over a `SharedMemoryRegistry` (see
shared_memory): a mixin of the KServe servicer, which sets `shared_memory` (None: disabled,
every call UNIMPLEMENTED) and `where` (the tier, in messages). CUDA shared memory is not
supported: its calls say so.
"""
from __future__ import annotations

import grpc

from wpk.runtime import protocol as pb
from wpk.runtime.shared_memory import SharedMemoryRegistry
from wpk.runtime.status import TierError


class SharedMemoryRpcs:
    shared_memory: SharedMemoryRegistry | None
    where: str

    async def _registry(self, context) -> SharedMemoryRegistry:
        if self.shared_memory is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"{self.where}: system shared memory is disabled on this "
                                f"server (--no-shared-memory)")
        return self.shared_memory

    async def SystemSharedMemoryRegister(self, request, context):
        registry = await self._registry(context)
        try:
            registry.register(request.name, request.key, request.offset, request.byte_size)
        except TierError as error:
            await context.abort(error.code, error.details)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryStatus(self, request, context):
        registry = await self._registry(context)
        try:
            regions = registry.status(request.name)
        except TierError as error:
            await context.abort(error.code, error.details)
        response = pb.SystemSharedMemoryStatusResponse()
        for region in regions:
            status = response.regions[region.name]
            status.name, status.key = region.name, region.key
            status.offset, status.byte_size = region.offset, region.byte_size
        return response

    async def SystemSharedMemoryUnregister(self, request, context):
        (await self._registry(context)).unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def _no_cuda(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{self.where}: CUDA shared memory is not supported by wpk tiers; "
                            f"use system shared memory")

    CudaSharedMemoryStatus = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = _no_cuda
