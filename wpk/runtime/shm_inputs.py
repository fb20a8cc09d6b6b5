"""Client side of the system shared-memory extension: `InferenceClient(shared_memory=True)`.

Inputs are written into a POSIX shared-memory region (`multiprocessing.shared_memory`) that
the client registered with the server once; the request then carries only the region's name,
offset and byte size per input (see `shared_memory`). One region per request in flight, kept
and reused across calls (a region is re-created larger when the inputs outgrow it). Only for
servers on the client's own host.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Awaitable, Callable, Mapping, Sequence

import numpy as np

from wpk.runtime import protocol as pb
from wpk.runtime.shared_memory import BYTE_SIZE_PARAM, OFFSET_PARAM, REGION_PARAM
from wpk.runtime.tensors import datatype_of
from wpk.runtime.infer_messages import set_parameter

ALIGN = 64            # each input starts on a cache line
MIN_REGION = 1 << 16


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Slot:
    region: str                       # the name the server knows it by
    memory: shared_memory.SharedMemory

    @property
    def size(self) -> int:
        return self.memory.size


class InputSlots:
    """Registered regions for the inputs of the requests in flight. `call(method, request)`
    sends one shared-memory RPC to the server (raising TierError)."""

    _regions = itertools.count()

    def __init__(self, call: Callable[[str, object], Awaitable[object]]):
        self.call = call
        self.free: list[Slot] = []
        self.prefix = f"wpk_{os.getpid()}_{id(self):x}"

    async def acquire(self, nbytes: int) -> Slot:
        """A registered region of at least `nbytes`, now this caller's."""
        while self.free:
            slot = self.free.pop()
            if slot.size >= nbytes:
                return slot
            await self.retire(slot)  # too small for these inputs
        memory = shared_memory.SharedMemory(create=True, size=max(nbytes, MIN_REGION))
        slot = Slot(f"{self.prefix}_{next(self._regions)}", memory)
        try:
            await self.call("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
                name=slot.region, key=f"/{memory.name}", offset=0, byte_size=memory.size))
        except BaseException:
            self._destroy(slot)
            raise
        return slot

    def release(self, slot: Slot) -> None:
        self.free.append(slot)

    async def retire(self, slot: Slot) -> None:
        """Unregister and free a region (one the server may still read is never reused)."""
        try:
            await self.call("SystemSharedMemoryUnregister",
                            pb.SystemSharedMemoryUnregisterRequest(name=slot.region))
        except Exception:  # the server is gone: nothing to unregister
            pass
        self._destroy(slot)

    @staticmethod
    def _destroy(slot: Slot) -> None:
        slot.memory.close()
        try:
            slot.memory.unlink()
        except FileNotFoundError:
            pass

    async def close(self) -> None:
        slots, self.free = self.free, []
        for slot in slots:
            await self.retire(slot)

    @staticmethod
    def request(slot: Slot, model: str, arrays: Mapping[str, np.ndarray],
                outputs: Sequence[str] | None, parameters: Mapping | None,
                request_id: str):
        """Copy `arrays` into `slot` and build the ModelInferRequest that names them."""
        request = pb.ModelInferRequest(model_name=model, id=request_id)
        for key, value in (parameters or {}).items():
            set_parameter(request.parameters, key, value)
        buffer = slot.memory.buf
        offset = 0
        for name, array in arrays.items():
            tensor = request.inputs.add(name=name, datatype=datatype_of(array.dtype),
                                        shape=array.shape)
            destination = np.frombuffer(buffer, dtype=array.dtype, count=array.size,
                                        offset=offset)
            np.copyto(destination.reshape(array.shape), array)
            del destination  # no export of the buffer left behind (close() needs that)
            set_parameter(tensor.parameters, REGION_PARAM, slot.region)
            set_parameter(tensor.parameters, OFFSET_PARAM, offset)
            set_parameter(tensor.parameters, BYTE_SIZE_PARAM, array.nbytes)
            offset = _aligned(offset + array.nbytes)
        for name in outputs or ():
            request.outputs.add(name=name)
        return request

    @staticmethod
    def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
        return sum(_aligned(a.nbytes) for a in arrays.values())
