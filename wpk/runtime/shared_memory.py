"""Server side of Triton's system shared-memory extension: named regions of POSIX
shared-memory objects, inputs read from them in place, outputs written into them.

A client on the tier's host creates a shared-memory object (`/dev/shm/<key>`), registers part
of it as a region (name, key, offset, byte_size), then names the region in an input's
parameters instead of sending the tensor's bytes:

    shared_memory_region     region name (string)
    shared_memory_offset     bytes from the region's start (int, default 0)
    shared_memory_byte_size  bytes the tensor takes there (int)

Inputs become numpy views of the mapping (no copy: ONNX Runtime reads the client's memory).
Requested outputs with these parameters are written into the region and come back without
their bytes (Triton's behaviour). The client must not change an input region while its
request is in flight.
"""
from __future__ import annotations

import math
import mmap
import os
import stat
from dataclasses import dataclass
from typing import Mapping

import grpc
import numpy as np

from wpk.runtime.protocol import parameter_value
from wpk.runtime.status import TierError
from wpk.runtime.tensors import TensorError, dtype_of, shape_text

REGION_PARAM = "shared_memory_region"
OFFSET_PARAM = "shared_memory_offset"
BYTE_SIZE_PARAM = "shared_memory_byte_size"
EXTENSION = "system_shared_memory"   # in ServerMetadata.extensions, as Triton names it
SHM_DIR = "/dev/shm"


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap
    view: memoryview     # the region's bytes: mapping[offset:offset + byte_size]

    def close(self) -> None:
        try:
            self.view.release()
            self.mapping.close()
        except BufferError:
            pass  # a request still reads it: unmapped when its last array is gone


@dataclass(frozen=True)
class OutputTarget:
    region: Region
    offset: int
    byte_size: int


def uses_shared_memory(parameters) -> bool:
    return REGION_PARAM in parameters


class SharedMemoryRegistry:
    """The regions registered with one tier server (`where` names it in messages)."""

    def __init__(self, where: str):
        self.where = where
        self.regions: dict[str, Region] = {}

    # -- the extension's RPCs ----------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        if not name:
            raise TierError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{self.where}: shared memory region needs a name")
        if name in self.regions:
            held = self.regions[name]
            raise TierError(grpc.StatusCode.ALREADY_EXISTS,
                            f"{self.where}: shared memory region {name!r} is already "
                            f"registered (key {held.key!r}); unregister it first")
        file_name = key[1:] if key.startswith("/") else key
        if not file_name or "/" in file_name or "\0" in file_name or file_name in (".", ".."):
            raise TierError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{self.where}: shared memory region {name!r}: key {key!r} is "
                            f"not a POSIX shared memory name ('/name')")
        if byte_size <= 0:
            raise TierError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{self.where}: shared memory region {name!r}: byte_size must "
                            f"be > 0")
        try:
            # no symlinks: a link in /dev/shm must not let a client map (and have outputs
            # written into) any file this server can write
            fd = os.open(os.path.join(SHM_DIR, file_name),
                         os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as error:
            raise TierError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{self.where}: shared memory region {name!r}: cannot open key "
                            f"{key!r} ({error.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise TierError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{self.where}: shared memory region {name!r}: key {key!r} "
                                f"is not a shared memory object")
            size = info.st_size
            if offset + byte_size > size:
                raise TierError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{self.where}: shared memory region {name!r}: offset "
                                f"{offset} + byte_size {byte_size} runs past the end of key "
                                f"{key!r} ({size} bytes)")
            try:
                mapping = mmap.mmap(fd, offset + byte_size, access=mmap.ACCESS_WRITE)
            except (OSError, OverflowError, ValueError) as error:  # ENOMEM, EMFILE, ...
                raise TierError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.where}: shared memory region {name!r}: cannot map "
                                f"{offset + byte_size} bytes of key {key!r} ({error})"
                                ) from None
        finally:
            os.close(fd)
        view = memoryview(mapping)[offset:offset + byte_size]
        region = Region(name, key, offset, byte_size, mapping, view)
        self.regions[name] = region
        return region

    def status(self, name: str = "") -> list[Region]:
        if not name:
            return list(self.regions.values())
        if name not in self.regions:
            raise TierError(grpc.StatusCode.NOT_FOUND,
                            f"{self.where}: no shared memory region {name!r} is registered")
        return [self.regions[name]]

    def unregister(self, name: str = "") -> None:
        """Forget region `name` (every region when empty); unknown names are no error."""
        names = [name] if name else list(self.regions)
        for region_name in names:
            region = self.regions.pop(region_name, None)
            if region is not None:
                region.close()

    def close(self) -> None:
        self.unregister()

    # -- inference -------------------------------------------------------------------------
    def _locate(self, what: str, parameters) -> tuple[Region, int, int]:
        """(region, offset, byte size) named by a tensor's parameters, bounds checked."""
        name = parameter_value(parameters[REGION_PARAM])
        if not isinstance(name, str) or not name:
            raise TensorError(f"{what}: {REGION_PARAM} must be a region name (string)")
        region = self.regions.get(name)
        if region is None:
            raise TensorError(f"{what}: shared memory region {name!r} is not registered "
                              f"with {self.where}")
        offset = parameter_value(parameters[OFFSET_PARAM]) if OFFSET_PARAM in parameters else 0
        if BYTE_SIZE_PARAM not in parameters:
            raise TensorError(f"{what}: {REGION_PARAM} given without {BYTE_SIZE_PARAM}")
        byte_size = parameter_value(parameters[BYTE_SIZE_PARAM])
        for label, value in ((OFFSET_PARAM, offset), (BYTE_SIZE_PARAM, byte_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TensorError(f"{what}: {label} must be an integer >= 0, got {value!r}")
        if offset + byte_size > region.byte_size:
            raise TensorError(f"{what}: offset {offset} + byte size {byte_size} runs past the "
                              f"end of shared memory region {name!r} ({region.byte_size} "
                              f"bytes)")
        try:  # one fstat: reading past the end of a shrunk object would kill the server
            size = region.mapping.size()   # with SIGBUS
        except (OSError, ValueError):
            size = -1
        if region.offset + offset + byte_size > size:
            raise TensorError(f"{what}: the object of shared memory region {name!r} (key "
                              f"{region.key!r}) shrank to {max(size, 0)} bytes after it was "
                              f"registered; register it again")
        return region, offset, byte_size

    def input_array(self, model: str, tensor_name: str, datatype: str,
                    shape: tuple[int, ...], parameters) -> np.ndarray:
        """The input as a view of its region (no copy), its byte size checked."""
        what = f"model {model!r} input {tensor_name!r}"
        region, offset, byte_size = self._locate(what, parameters)
        dtype = dtype_of(datatype)
        count = math.prod(shape)
        if byte_size != count * dtype.itemsize:
            raise TensorError(f"{what}: {BYTE_SIZE_PARAM} is {byte_size}, shape "
                              f"{shape_text(shape)} {datatype} needs {count * dtype.itemsize}")
        return np.frombuffer(region.view, dtype=dtype, count=count,
                             offset=offset).reshape(shape)

    def output_targets(self, request, model: str) -> dict[str, OutputTarget]:
        """Requested outputs to write into shared memory, by name (checked before the model
        runs, so that a bad region fails the request early)."""
        targets = {}
        for output in request.outputs:
            if uses_shared_memory(output.parameters):
                targets[output.name] = OutputTarget(*self._locate(
                    f"model {model!r} output {output.name!r}", output.parameters))
        return targets

    @staticmethod
    def write_outputs(model: str, targets: Mapping[str, OutputTarget],
                      arrays: Mapping[str, np.ndarray]) -> None:
        """Copy each output into its target; a target too small fails the request."""
        for name, target in targets.items():
            array = arrays[name]
            if array.nbytes > target.byte_size:
                raise TensorError(f"model {model!r} output {name!r}: "
                                  f"{BYTE_SIZE_PARAM} is {target.byte_size}, the output "
                                  f"(shape {shape_text(array.shape)}) needs {array.nbytes}")
            try:
                destination = np.frombuffer(target.region.view, dtype=array.dtype,
                                            count=array.size, offset=target.offset)
            except ValueError:  # released: unregistered while this request ran
                raise TensorError(f"model {model!r} output {name!r}: shared memory region "
                                  f"{target.region.name!r} was unregistered while the "
                                  f"request ran") from None
            np.copyto(destination.reshape(array.shape), array)
