"""Lower a Compute to CUDA C: one thread per output element, reductions in a register.

The schedule knobs on a GPU are the block size, the unroll factor of the innermost reduce
loop and the order of the reduce loops. Padded inputs are read through a bounds-checked
loader instead of a padded copy. Kernels compile to PTX with nvcc on any machine and run
through pycuda (or CuPy where pycuda is missing) on a GPU.
"""
from __future__ import annotations

import math
import re

import numpy as np

from wpk.optimizer.dsl import Compute
from wpk.optimizer.space import Config, Knob, Space


FLT_MAX = "3.402823466e+38f"


def cuda_space() -> Space:
    return Space([Knob("block", (64, 128, 256, 512)), Knob("unroll", (1, 2, 4, 8)),
                  Knob("reduce_order", ("default", "reversed"))])


def lower_cuda(compute: Compute, config: Config | None = None) -> str:
    config = config or {"block": 128, "unroll": 1, "reduce_order": "default"}
    c = compute
    params = ", ".join(
        (f"const float* __restrict__ {b.name}" if b.role == "in" else f"float* __restrict__ {b.name}")
        for b in c.buffers)
    total = math.prod(a.extent for a in c.spatial)
    lines = []
    term = c.term
    if c.padding is not None:
        p = c.padding
        n, ch, h, w = p.shape
        hp, wp = h + p.pads[0] + p.pads[2], w + p.pads[1] + p.pads[3]
        lines += [
            f"__device__ __forceinline__ float load_{p.target}(const float* __restrict__ src, int i) {{",
            f"  const int x = i % {wp} - {p.pads[1]}; const int y = (i / {wp}) % {hp} - {p.pads[0]};",
            f"  const int q = i / {hp * wp};",
            f"  return ((unsigned)y < {h}u && (unsigned)x < {w}u) ? src[(q * {h} + y) * {w} + x] "
            f": {p.fill};",
            "}"]
        term = re.sub(rf"\b{p.target}\[([^\[\]]*)\]", rf"load_{p.target}({p.source}, \1)", term)
    lines += [f'extern "C" __global__ void {c.name}({params}) {{',
              "  const int tid = blockIdx.x * blockDim.x + threadIdx.x;",
              f"  if (tid >= {total}) return;",
              "  int rem = tid;"]
    for axis in reversed(c.spatial):
        lines.append(f"  const int {axis.name} = rem % {axis.extent}; rem /= {axis.extent};")
    lines.append(f"  float acc = {c.init};")
    reduce = c.reduce if config.get("reduce_order") != "reversed" else list(reversed(c.reduce))
    for i, axis in enumerate(reduce):
        if i == len(reduce) - 1 and config.get("unroll", 1) > 1:
            lines.append(f"  #pragma unroll {config['unroll']}")
        lines.append(f"  for (int {axis.name} = 0; {axis.name} < {axis.extent}; ++{axis.name}) {{")
    lets = " ".join(f"const int {name} = {expr};" for name, expr in c.lets)
    step = f"acc += ({term});" if c.combine == "sum" else f"acc = fmaxf(acc, ({term}));"
    lines.append(f"    {lets} " + (f"if ({c.guard}) {step}" if c.guard else step))
    lines += ["  }"] * len(reduce)
    epilogue = c.epilogue or "v"
    lines += [f"  {{ const float v = acc; {c.output.name}[{c.out_index}] = {epilogue}; }}", "}"]
    # NVRTC (CuPy's compiler) has no C library headers, so no <float.h>: spell FLT_MAX out
    return re.sub(r"\bFLT_MAX\b", FLT_MAX, "\n".join(lines)) + "\n"


def grid(compute: Compute, config: Config) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    total = math.prod(a.extent for a in compute.spatial)
    block = int(config.get("block", 128))
    return (-(-total // block), 1, 1), (block, 1, 1)


def run_on_gpu(compute: Compute, config: Config, arrays: list[np.ndarray],
               repeats: int = 0) -> tuple[np.ndarray, float | None]:
    """Run the kernel on the GPU (pycuda first, CuPy as a fallback); returns the output and,
    with repeats > 0, the mean kernel time in ms measured with CUDA events."""
    source = lower_cuda(compute, config)
    blocks, threads = grid(compute, config)
    try:
        import pycuda.autoinit  # noqa: F401
        import pycuda.driver as cuda
        from pycuda.compiler import SourceModule

        module = SourceModule(source, no_extern_c=True)
        fn = module.get_function(compute.name)
        gpu = [cuda.mem_alloc(a.nbytes) for a in arrays]
        for g, a in zip(gpu, arrays):
            cuda.memcpy_htod(g, np.ascontiguousarray(a))
        fn(*gpu, block=threads, grid=blocks)
        ms = None
        if repeats:
            start, end = cuda.Event(), cuda.Event()
            start.record()
            for _ in range(repeats):
                fn(*gpu, block=threads, grid=blocks)
            end.record()
            end.synchronize()
            ms = start.time_till(end) / repeats
        out = np.empty_like(arrays[-1])
        cuda.memcpy_dtoh(out, gpu[-1])
        return out, ms
    except ImportError:
        import cupy

        fn = cupy.RawKernel(source, compute.name)
        gpu = [cupy.asarray(a) for a in arrays]
        fn(blocks, threads, tuple(gpu))
        ms = None
        if repeats:
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            for _ in range(repeats):
                fn(blocks, threads, tuple(gpu))
            end.record()
            end.synchronize()
            ms = cupy.cuda.get_elapsed_time(start, end) / repeats
        return cupy.asnumpy(gpu[-1]), ms
