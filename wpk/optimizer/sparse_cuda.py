"""A sparse GEMM for NVIDIA GPUs that skips the weight rows a tile-wise pruned weight has
zeroed, generated as CUDA C (compiled with nvcc or NVRTC, run through pycuda or CuPy).

Y [M, N] = X [M, K] @ W.T (+ bias), W [N, K] as ONNX's Gemm(transB=1) holds it. The output
columns are cut into groups of `GROUP` (64, one thread block's width). A group keeps the
reduction rows k where any of its 64 columns of W is non-zero: with a tile-wise pattern
(Guo et al., SC 2020: whole rows zero inside a tile of G >= 64 columns) that is a quarter
of the rows at 75 %, so the group's work is a dense GEMM a quarter the size. Each group's
kept rows are packed ahead of time: their indices (`int32`) and their weights, [kept, 64]
row-major, so a thread block reads its weights as one contiguous stream.

The kernel: one thread block of 256 threads per (64 rows of X, one group), a 64 x 64 output
tile; per step of 16 kept rows it gathers X's 16 columns and the packed weights into shared
memory, then each thread accumulates a 4 x 4 register tile. Every thread reaches every
`__syncthreads` (bounds are handled by zero fills, never by an early return), which also
lets the host emulation in the tests run the same source.

What it cannot use: N:M patterns (2:4) zero different rows in each output column, so the
union over 64 columns is dense; on Ampere and later those need sparse tensor cores
(cuSPARSELt, `mma.sp`), which this kernel does not generate. `kept_fraction` says so before
anything is compiled.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 64        # output columns per thread block
TILE_ROWS = 64    # rows of X per thread block
STEP = 16         # kept rows per shared-memory step
THREADS = 256     # 16 x 16 threads, a 4 x 4 register tile each


@dataclass(frozen=True)
class SparseGemm:
    """One GEMM's packed weights: per group its kept rows (`rows[offsets[g]:offsets[g+1]]`)
    and their weights (`weights[offsets[g] * GROUP:...]`, [kept, GROUP] row-major; columns
    past N are zero)."""

    m: int
    k: int
    n: int
    rows: np.ndarray        # int32, kept reduction indices of every group, concatenated
    offsets: np.ndarray     # int32, groups + 1
    weights: np.ndarray     # float32

    @property
    def groups(self) -> int:
        return len(self.offsets) - 1

    @property
    def kept_fraction(self) -> float:
        """The share of the dense GEMM's multiply-adds the kernel does."""
        return float(self.offsets[-1]) / max(self.groups * self.k, 1)


def pack(weight: np.ndarray, m: int) -> SparseGemm:
    """Pack `weight` [N, K] for a GEMM with `m` rows of X."""
    weight = np.asarray(weight, np.float32)
    n, k = weight.shape
    groups = -(-n // GROUP)
    padded = np.zeros((groups * GROUP, k), np.float32)
    padded[:n] = weight
    rows, offsets, packed = [], [0], []
    for g in range(groups):
        columns = padded[g * GROUP:(g + 1) * GROUP]            # [GROUP, K]
        kept = np.flatnonzero((columns != 0).any(axis=0)).astype(np.int32)
        rows.append(kept)
        offsets.append(offsets[-1] + len(kept))
        packed.append(columns[:, kept].T.ravel())               # [kept, GROUP]
    return SparseGemm(m, k, n, np.concatenate(rows).astype(np.int32),
                      np.asarray(offsets, np.int32),
                      np.ascontiguousarray(np.concatenate(packed), np.float32))


def grid(g: SparseGemm) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(blocks, threads) of a launch: x over groups, y over tiles of rows."""
    return (g.groups, -(-g.m // TILE_ROWS), 1), (THREADS, 1, 1)


def lower(g: SparseGemm, name: str, bias: bool) -> str:
    """CUDA C of `name(X, W, rows, offsets, B, Y)` for `g` (B ignored without `bias`)."""
    epilogue = "acc[i][j] + B[n]" if bias else "acc[i][j]"
    return f"""#define M {g.m}
#define K {g.k}
#define N {g.n}
#define TILE {TILE_ROWS}
#define WIDTH {GROUP}
#define STEP {STEP}
extern "C" __global__ void {name}(const float* __restrict__ X, const float* __restrict__ W,
                                  const int* __restrict__ rows, const int* __restrict__ offsets,
                                  const float* __restrict__ B, float* __restrict__ Y) {{
  /* X's gathered columns, transposed; one float of padding per row, so that the 16 threads
     writing one row's 16 kept columns hit 16 banks */
  __shared__ float xs[STEP][TILE + 1];
  __shared__ float ws[STEP][WIDTH];   /* the group's packed weights */
  __shared__ int ks[STEP];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int group = blockIdx.x, m0 = blockIdx.y * TILE;
  const int first = offsets[group], kept = offsets[group + 1] - first;
  const float* __restrict__ wg = W + (long)first * WIDTH;
  float acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  for (int t = 0; t < kept; t += STEP) {{
    if (tid < STEP) ks[tid] = t + tid < kept ? rows[first + t + tid] : -1;
    __syncthreads();
    for (int e = tid; e < STEP * TILE; e += {THREADS}) {{
      const int kk = e % STEP, m = e / STEP;
      xs[kk][m] = ks[kk] >= 0 && m0 + m < M ? X[(long)(m0 + m) * K + ks[kk]] : 0.0f;
    }}
    for (int e = tid; e < STEP * WIDTH; e += {THREADS}) {{
      const int kk = e / WIDTH;
      ws[kk][e % WIDTH] = t + kk < kept ? wg[(long)t * WIDTH + e] : 0.0f;
    }}
    __syncthreads();
    #pragma unroll
    for (int kk = 0; kk < STEP; ++kk) {{
      float a[4], b[4];
      for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty * 4 + i];
      for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx * 4 + j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }}
    /* no barrier here: the next step writes only ks before its first barrier, which every
       thread reaches after this step's reads of xs and ws */
  }}
  for (int i = 0; i < 4; ++i) {{
    const int m = m0 + ty * 4 + i;
    for (int j = 0; j < 4; ++j) {{
      const int n = group * WIDTH + tx * 4 + j;
      if (m < M && n < N) Y[(long)m * N + n] = {epilogue};
    }}
  }}
}}
"""


def run_on_gpu(g: SparseGemm, x: np.ndarray, bias: np.ndarray | None = None,
               repeats: int = 0) -> tuple[np.ndarray, float | None]:
    """Y for `x` [M, K] on the GPU (CuPy, which compiles with NVRTC); with repeats > 0 also
    the mean kernel time in ms from CUDA events."""
    import cupy

    name = "wpk_sparse_gemm"
    kernel = cupy.RawKernel(lower(g, name, bias is not None), name)
    args = (cupy.asarray(np.ascontiguousarray(x, np.float32)), cupy.asarray(g.weights),
            cupy.asarray(g.rows if g.rows.size else np.zeros(1, np.int32)),
            cupy.asarray(g.offsets),
            cupy.asarray(np.zeros(1, np.float32) if bias is None else
                         np.ascontiguousarray(bias, np.float32)),
            cupy.zeros((g.m, g.n), cupy.float32))
    blocks, threads = grid(g)
    kernel(blocks, threads, args)
    ms = None
    if repeats:
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(repeats):
            kernel(blocks, threads, args)
        end.record()
        end.synchronize()
        ms = cupy.cuda.get_elapsed_time(start, end) / repeats
    return cupy.asnumpy(args[-1]), ms
