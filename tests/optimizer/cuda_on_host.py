"""Run a generated CUDA kernel's own source on the CPU, for tests on machines without a GPU.

The source is compiled as C++ after a prelude that gives CUDA's names a host meaning: the
thread blocks of a launch run one after another, the threads of a block as real threads
(`std::thread`), `__syncthreads()` a `std::barrier` over them, `__shared__` arrays one
static copy that the block's threads share. What this checks is the kernel's logic (its
indexing, bounds, the shared-memory hand-offs between barriers: a missing barrier races
here too); what it cannot check is anything about the GPU itself (speed, coalescing, bank
conflicts, warp-level behaviour).
"""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx;
static dim3 blockIdx, blockDim, gridDim;
static std::barrier<>* block_barrier;
static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
"""

LAUNCHER = r"""
extern "C" void launch(void** args, unsigned gx, unsigned gy, unsigned threads) {
  gridDim = {gx, gy, 1};
  blockDim = {threads, 1, 1};
  for (unsigned by = 0; by < gy; ++by)
    for (unsigned bx = 0; bx < gx; ++bx) {
      blockIdx = {bx, by, 0};
      std::barrier<> barrier((std::ptrdiff_t)threads);
      block_barrier = &barrier;
      std::vector<std::thread> team;
      for (unsigned t = 0; t < threads; ++t)
        team.emplace_back([=] { threadIdx = {t, 0, 0}; %(call)s; });
      for (auto& member : team) member.join();
    }
}
"""


def available() -> bool:
    return shutil.which("g++") is not None


def compile_kernel(source: str, name: str, parameter_types: list[str]) -> ctypes.CDLL:
    """The kernel `name` of `source` with a `launch(args, gx, gy, threads)` entry; its
    parameters (in order) have the C++ types `parameter_types`."""
    call = f"{name}(" + ", ".join(f"({t})args[{i}]" for i, t in enumerate(parameter_types)) + ")"
    text = PRELUDE + source + LAUNCHER % {"call": call}
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    directory = Path(tempfile.gettempdir()) / "wpk-cuda-on-host"
    directory.mkdir(exist_ok=True)
    library = directory / f"{name}_{digest}.so"
    if not library.exists():
        cpp = directory / f"{name}_{digest}.cpp"
        cpp.write_text(text)
        subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                        "-Wno-unknown-pragmas", str(cpp), "-o", str(library)], check=True,
                       capture_output=True, text=True)
    return ctypes.CDLL(str(library))


def launch(library: ctypes.CDLL, arrays: list[np.ndarray], blocks: tuple[int, ...],
           threads: tuple[int, ...]) -> None:
    """Run the kernel over `blocks` (x, y) of `threads` (x) on the arrays, in place."""
    pointers = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    library.launch(pointers, ctypes.c_uint(blocks[0]), ctypes.c_uint(blocks[1]),
                   ctypes.c_uint(threads[0]))
