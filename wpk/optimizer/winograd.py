"""Winograd convolution for 3x3 stride-1 Conv (fused bias, residual Add and Relu), generated as
C with AVX-512 intrinsics, one kernel per shape, run on the process-wide pool (`pool.py`) or,
as custom operators, on ONNX Runtime's own (`ort_ops.py`).

Why: ONNX Runtime's NCHWc direct convolutions already run near this CPU's FMA peak, so a direct
kernel cannot beat them by much; Winograd F(m x m, 3 x 3) needs (m+2)^2 / (9 m^2) of the
multiplies (F(2,3): 1/2.25, F(4,3): 1/4) at the price of ~1e-7..1e-6 relative rounding.

Layouts: NCHW (what the segment executor hands over; the layout change is folded into the
transforms), or NCHWc, ONNX Runtime's 16-channel blocks (`layout="nchwc"`, for custom
operators inside its NCHWc graph: a pixel's channels are one vector, no transposes). Three
phases per work item:
1. input: transpose the input rows a band of tiles needs into a pixel-major block in L1 (zero
   padding included), then V = B^T d B vectorized over 16 channels, stored V[position][tile][c];
2. per position p: a register-blocked GEMM M[p] = V[p] (tiles x C) * U[p] (C x K), U being
   the weights transformed once at load time (U = G w G^T);
3. output: A^T M A plus bias, transposed back to NCHW rows with the residual added and Relu
   applied on the way out.
Split "tiles": a work item is a band of tiles through all three phases (no barrier; its V and
M stay in L2). Split "channels" (few tiles, many channels): the input phase over all tiles,
then items own blocks of output channels. Scratch is allocated once per kernel (a try-lock
gives a concurrent caller its own).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from fractions import Fraction as F

import numpy as np
import onnx

from wpk import settings
from wpk.optimizer import activations

# Lavin & Gray's matrices (points 0, +-1, +-2 / +-1/2 for m = 4).
MATRICES = {
    2: dict(
        BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        G=[[1, 0, 0], [F(1, 2), F(1, 2), F(1, 2)], [F(1, 2), F(-1, 2), F(1, 2)], [0, 0, 1]],
        AT=[[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: dict(
        BT=[[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        G=[[F(1, 4), 0, 0], [F(-1, 6), F(-1, 6), F(-1, 6)], [F(-1, 6), F(1, 6), F(-1, 6)],
           [F(1, 24), F(1, 12), F(1, 6)], [F(1, 24), F(-1, 12), F(1, 6)], [0, 0, 1]],
        AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
            [0, 1, -1, 8, -8, 1]]),
}


# (tile size m, thread split) variants per-operator selection times
VARIANTS: tuple[tuple[int, str], ...] = ((4, "tiles"), (2, "tiles"), (4, "channels"),
                                         (2, "channels"))
# relative L2 error a variant may add to one convolution (F(4,3) in fp32 is ~1e-6)
TOLERANCE = 2e-5


@dataclass(frozen=True)
class WinogradShape:
    c: int
    k: int
    h: int
    w: int
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    m: int = 4                        # output tile size: 2 or 4
    relu: str | bool = False                # activation: `activations.py` ("relu", "clip:..")
    residual: bool = False
    threads: int = 2
    split: str = "tiles"              # threads own tiles (all phases, no barrier) or channels
    layout: str = "nchw"              # or "nchwc": ONNX Runtime's blocked [C/16][H][W][16]

    @property
    def out_hw(self) -> tuple[int, int]:
        t, l, b, r = self.pads
        return self.h + t + b - 2, self.w + l + r - 2

    @property
    def alpha(self) -> int:
        return self.m + 2

    @property
    def tiles(self) -> tuple[int, int]:
        oh, ow = self.out_hw
        return -(-oh // self.m), -(-ow // self.m)

    def blocking(self) -> tuple[int, int, int]:
        """(k vectors, tiles) of the GEMM register block (up to 2 x 14 or 1 x 28
        accumulators) and the tiles of one work item (split "tiles": a multiple of the block,
        about 28, as many items per thread as possible; split "channels": all tiles)."""
        kw = 2 if (-(-self.k // 16)) % 2 == 0 else 1
        limit = 14 if kw == 2 else 28
        ty, tx = self.tiles
        tiles = ty * tx
        threads = max(1, self.threads)
        if self.split == "tiles":
            items = threads * -(-tiles // (threads * 28))
            band = -(-tiles // items)
            blocks = -(-band // limit)
            tb = -(-band // blocks)
            return kw, tb, tb * blocks
        blocks = -(-tiles // limit)
        tb = -(-tiles // blocks)
        return kw, tb, tb * blocks

    def flops(self) -> float:
        oh, ow = self.out_hw
        return 2.0 * self.c * self.k * 9 * oh * ow


@functools.lru_cache(maxsize=1)
def supported() -> tuple[bool, str]:
    """(True, '') where the kernels build and run: an x86-64 CPU with AVX-512F and gcc."""
    import platform
    import shutil

    if platform.machine() not in ("x86_64", "AMD64"):
        return False, f"Winograd kernels need x86-64 with AVX-512 (this is {platform.machine()})"
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        flags = ""
    if " avx512f" not in flags:
        return False, "Winograd kernels need AVX-512F, which this CPU lacks"
    if shutil.which(settings.c_compiler()) is None:
        return False, "Winograd kernels need gcc"
    return True, ""


def channels_split_useful(shape: "WinogradShape", m: int) -> bool:
    """Splitting output channels over threads pays where few tiles meet many channels."""
    oh, ow = shape.out_hw
    tiles = -(-oh // m) * -(-ow // m)
    return tiles <= 64 and shape.k >= 64


def transform_weights(weight: np.ndarray, m: int) -> np.ndarray:
    """U[p][c][k] = (G w[k, c] G^T)[p], zero-padded to multiples of 16 in c and k."""
    k, c = weight.shape[:2]
    g = np.array([[float(v) for v in row] for row in MATRICES[m]["G"]])
    u = np.einsum("ai,kcij,bj->abck", g, weight.astype(np.float64), g)
    alpha = m + 2
    cp, kp = -(-c // 16) * 16, -(-k // 16) * 16
    out = np.zeros((alpha * alpha, cp, kp), np.float32)
    out[:, :c, :k] = u.reshape(alpha * alpha, c, k)
    return out


def _combine(coeffs: list, names: list[str]) -> str:
    """A C expression sum(coeff * name) over __m512 values with constant coefficients."""
    expr = None
    for coeff, name in zip(coeffs, names):
        coeff = float(coeff)
        if coeff == 0:
            continue
        if expr is None:
            if coeff == 1:
                expr = name
            elif coeff == -1:
                expr = f"_mm512_sub_ps(_mm512_setzero_ps(), {name})"
            else:
                expr = f"_mm512_mul_ps(_mm512_set1_ps({coeff!r}f), {name})"
        elif coeff == 1:
            expr = f"_mm512_add_ps({expr}, {name})"
        elif coeff == -1:
            expr = f"_mm512_sub_ps({expr}, {name})"
        else:
            expr = f"_mm512_fmadd_ps(_mm512_set1_ps({coeff!r}f), {name}, {expr})"
    return expr or "_mm512_setzero_ps()"


def _transform(matrix: list, src: str, dst: str, n_in: int) -> list[str]:
    """dst = matrix * src * matrix^T for src an n_in x n_in array of __m512 (unrolled)."""
    rows = len(matrix)
    lines = [f"__m512 {dst}_t[{rows}][{n_in}];"]
    for i in range(rows):
        for j in range(n_in):
            lines.append(f"{dst}_t[{i}][{j}] = "
                         f"{_combine(matrix[i], [f'{src}[{k}][{j}]' for k in range(n_in)])};")
    lines.append(f"__m512 {dst}[{rows}][{rows}];")
    for i in range(rows):
        for j in range(rows):
            lines.append(f"{dst}[{i}][{j}] = "
                         f"{_combine(matrix[j], [f'{dst}_t[{i}][{k}]' for k in range(n_in)])};")
    return lines


TRANSPOSE16 = r"""
static inline void tr16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2*i] = _mm512_unpacklo_ps(r[2*i], r[2*i+1]);
    t[2*i+1] = _mm512_unpackhi_ps(r[2*i], r[2*i+1]);
  }
  for (int i = 0; i < 4; ++i) {
    __m512d a = _mm512_castps_pd(t[4*i]), b = _mm512_castps_pd(t[4*i+1]);
    __m512d c = _mm512_castps_pd(t[4*i+2]), d = _mm512_castps_pd(t[4*i+3]);
    r[4*i]   = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4*i+1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4*i+2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4*i+3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {
    t[j]   = _mm512_shuffle_f32x4(r[j], r[j+4], 0x88);
    t[j+4] = _mm512_shuffle_f32x4(r[j], r[j+4], 0xdd);
    t[j+8] = _mm512_shuffle_f32x4(r[j+8], r[j+12], 0x88);
    t[j+12] = _mm512_shuffle_f32x4(r[j+8], r[j+12], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {
    r[j]    = _mm512_shuffle_f32x4(t[j], t[j+8], 0x88);
    r[j+8]  = _mm512_shuffle_f32x4(t[j], t[j+8], 0xdd);
    r[j+4]  = _mm512_shuffle_f32x4(t[j+4], t[j+12], 0x88);
    r[j+12] = _mm512_shuffle_f32x4(t[j+4], t[j+12], 0xdd);
  }
}
"""


def lower(shape: WinogradShape, name: str) -> str:
    """C source of `void name(const float* x, const float* U, const float* bias,
    const float* residual, float* y)` for this shape (bias and residual may be NULL)."""
    s = shape
    if s.layout == "nchwc":
        pack_row, output_body = _nchwc_pack_row(s), _nchwc_output_body(s)
    else:
        pack_row, output_body = _nchw_pack_row(s), _nchw_output_body(s)
    jobs = _tiles_jobs(s) if s.split == "tiles" else _CHANNELS_JOBS
    return (_header(s) + _SCRATCH + _input_tiles(s, pack_row) + _GEMM_BLOCK
            + _output_tiles(output_body, jobs) + _entry(name))


def _header(s: WinogradShape) -> str:
    """Includes, the pool hooks, the job struct and the shape's #defines."""
    m, a = s.m, s.alpha
    oh, ow = s.out_hw
    ty, tx = s.tiles
    t_count = ty * tx
    cb, kb = -(-s.c // 16), -(-s.k // 16)
    kw, tb, band = s.blocking()
    v_rows = band   # tiles: one work item's V and M stay in L2; channels: all tiles
    per_slot = s.split == "tiles"
    return f"""#include <immintrin.h>
#include <stdlib.h>
#include <string.h>
{TRANSPOSE16}
{activations.C_HELPERS}
extern void wpk_pool_run(void (*fn)(int, int, void*), void* ctx, int total);
extern int wpk_pool_slots(void);
struct job {{ const float* x; const float* U; const float* bias; const float* res; float* y;
             float* scratch; }};
#define CIN {s.c}
#define KOUT {s.k}
#define H {s.h}
#define W {s.w}
#define OH {oh}
#define OW {ow}
#define TY {ty}
#define TX {tx}
#define T {t_count}
#define CB {cb}
#define KB {kb}
#define CP {cb * 16}
#define KP {kb * 16}
#define WP {tx * m + 2}
#define AA {a * a}
#define KW {kw}
#define TB {tb}
#define VR {v_rows}
#define V_SIZE ((size_t)AA * VR * CP)
#define M_SIZE ((size_t)AA * VR * KP)
#define SCRATCH ((V_SIZE + M_SIZE) * {"wpk_pool_slots()" if per_slot else 1})
"""


# the shared scratch buffer, and the guard that gives a concurrent caller its own
_SCRATCH = """
static float* scratch_buffer = 0;
static volatile int busy = 0;
/* unloaded with its library (ONNX Runtime unloads custom-op libraries with their sessions) */
__attribute__((destructor)) static void release_scratch(void) { free(scratch_buffer); }

"""


def _input_tiles(s: WinogradShape, pack_row: str) -> str:
    """Packing the input rows of a run of tiles (`pack_row`: one row, by layout) and their
    input transform."""
    m, a = s.m, s.alpha
    in_tf = "\n".join(_transform(MATRICES[m]["BT"], "d", "v", a))
    return f"""/* tiles txa..txb-1 of tile row tyy, channel block cbk: pack the input rows they need
   (NCHW -> pixel-major, zero padding), input transform, V[p][row0 + i][c] */
static inline void input_tiles(const float* __restrict__ x, float* __restrict__ V,
                               int cbk, int tyy, int txa, int txb, int row0) {{
  float lp[{a}][WP][16] __attribute__((aligned(64)));
  const int c0 = cbk * 16;
  const int nc = CIN - c0 < 16 ? CIN - c0 : 16;
  const int xs = txa * {m}, xe = txb * {m} + 2;           /* padded columns needed */
  const int ix_lo = xs - {s.pads[1]} > 0 ? xs - {s.pads[1]} : 0;
  const int ix_hi = xe - {s.pads[1]} < W ? xe - {s.pads[1]} : W;
  for (int r = 0; r < {a}; ++r) {{
    const int iy = tyy * {m} + r - {s.pads[0]};
    if (iy < 0 || iy >= H || ix_lo >= ix_hi) {{
      for (int q = xs; q < xe; ++q) _mm512_store_ps(lp[r][q], _mm512_setzero_ps());
      continue;
    }}
    for (int q = xs; q < ix_lo + {s.pads[1]}; ++q) _mm512_store_ps(lp[r][q], _mm512_setzero_ps());
    for (int q = ix_hi + {s.pads[1]}; q < xe; ++q) _mm512_store_ps(lp[r][q], _mm512_setzero_ps());
{pack_row}
  }}
  for (int txx = txa; txx < txb; ++txx) {{
    __m512 d[{a}][{a}];
    for (int i = 0; i < {a}; ++i)
      for (int j = 0; j < {a}; ++j) d[i][j] = _mm512_load_ps(lp[i][txx * {m} + j]);
{in_tf}
    const int t = row0 + txx - txa;
    for (int i = 0; i < {a}; ++i)
      for (int j = 0; j < {a}; ++j)
        _mm512_store_ps(V + ((size_t)(i * {a} + j) * VR + t) * CP + c0, v[i][j]);
  }}
}}

"""


_GEMM_BLOCK = """\
/* M[p][t0:t0+TB][k0:k0+16*KW] = V[p][t0:..][:CIN] * U[p][:CIN][k0:..] (register block) */
static inline void gemm_block(const float* __restrict__ V, const float* __restrict__ U,
                              float* __restrict__ M, int p, int k0, int t0) {
  __m512 acc[TB][KW];
  for (int i = 0; i < TB; ++i)
    for (int j = 0; j < KW; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* __restrict__ vp = V + ((size_t)p * VR + t0) * CP;
  const float* __restrict__ up = U + (size_t)p * CP * KP + k0;
  for (int c = 0; c < CIN; ++c) {
    __m512 u[KW];
    for (int j = 0; j < KW; ++j) u[j] = _mm512_loadu_ps(up + (size_t)c * KP + 16 * j);
    for (int i = 0; i < TB; ++i) {
      const __m512 v = _mm512_set1_ps(vp[(size_t)i * CP + c]);
      for (int j = 0; j < KW; ++j) acc[i][j] = _mm512_fmadd_ps(v, u[j], acc[i][j]);
    }
  }
  float* __restrict__ mp = M + ((size_t)p * VR + t0) * KP + k0;
  for (int i = 0; i < TB; ++i)
    for (int j = 0; j < KW; ++j) _mm512_store_ps(mp + (size_t)i * KP + 16 * j, acc[i][j]);
}

"""


def _output_tiles(output_body: str, jobs: str) -> str:
    """The output transform's function (`output_body`: by layout), then the work items."""
    return f"""\
/* tiles txa..txb-1 of tile row tyy, output channel block kbk: output transform + bias,
   transposed back to NCHW rows with the residual added and Relu applied */
static inline void output_tiles(const float* __restrict__ M, const float* __restrict__ bias,
                                const float* __restrict__ res, float* __restrict__ y,
                                int kbk, int tyy, int txa, int txb, int row0) {{
{output_body}
{jobs}
"""


def _entry(name: str) -> str:
    """The kernel's entry point: the shared scratch, or a private one when it is busy."""
    return f"""\
void {name}(const float* x, const float* U, const float* bias, const float* res, float* y) {{
  if (__sync_bool_compare_and_swap(&busy, 0, 1)) {{
    if (!scratch_buffer) {{
      scratch_buffer = (float*)aligned_alloc(64, SCRATCH * sizeof(float));
      memset(scratch_buffer, 0, SCRATCH * sizeof(float));
    }}
    struct job j = {{x, U, bias, res, y, scratch_buffer}};
    run(&j);
    __sync_lock_release(&busy);
  }} else {{  /* another caller is inside: a private scratch for this call */
    float* tmp = (float*)aligned_alloc(64, SCRATCH * sizeof(float));
    memset(tmp, 0, SCRATCH * sizeof(float));
    struct job j = {{x, U, bias, res, y, tmp}};
    run(&j);
    free(tmp);
  }}
}}
"""


def _tiles_jobs(s: WinogradShape) -> str:
    """Split "tiles": each work item runs all phases on its band of tiles, in its slot's
    scratch (no barrier)."""
    band = s.blocking()[2]
    return f"""
static void band_item(int item, int slot, void* arg) {{
  const struct job* j = (const struct job*)arg;
  float* __restrict__ V = j->scratch + (size_t)slot * (V_SIZE + M_SIZE);
  float* __restrict__ M = V + V_SIZE;
  const int b0 = item * {band};
  const int b1 = b0 + {band} < T ? b0 + {band} : T;
  for (int cbk = 0; cbk < CB; ++cbk)
    for (int t = b0; t < b1;) {{
      const int tyy = t / TX, txa = t % TX;
      const int txb = TX < txa + (b1 - t) ? TX : txa + (b1 - t);
      input_tiles(j->x, V, cbk, tyy, txa, txb, t - b0);
      t += txb - txa;
    }}
  const int blocks = (b1 - b0 + TB - 1) / TB;
  for (int p = 0; p < AA; ++p)
    for (int kq = 0; kq < KB / KW; ++kq)
      for (int i = 0; i < blocks; ++i) gemm_block(V, j->U, M, p, kq * 16 * KW, i * TB);
  for (int kbk = 0; kbk < KB; ++kbk)
    for (int t = b0; t < b1;) {{
      const int tyy = t / TX, txa = t % TX;
      const int txb = TX < txa + (b1 - t) ? TX : txa + (b1 - t);
      output_tiles(M, j->bias, j->res, j->y, kbk, tyy, txa, txb, t - b0);
      t += txb - txa;
    }}
}}

static void run(struct job* j) {{ wpk_pool_run(band_item, j, (T + {band} - 1) / {band}); }}
"""


# split "channels": the input transform over all tiles, then output channel blocks
_CHANNELS_JOBS = """
static void input_item(int item, int slot, void* arg) {
  const struct job* j = (const struct job*)arg;
  (void)slot;
  input_tiles(j->x, j->scratch, item / TY, item % TY, 0, TX, (item % TY) * TX);
}

static void output_item(int kq, int slot, void* arg) {
  const struct job* j = (const struct job*)arg;
  const float* __restrict__ V = j->scratch;
  float* __restrict__ M = j->scratch + V_SIZE;
  (void)slot;
  for (int p = 0; p < AA; ++p)
    for (int i = 0; i < VR / TB; ++i) gemm_block(V, j->U, M, p, kq * 16 * KW, i * TB);
  for (int kbk = kq * KW; kbk < (kq + 1) * KW; ++kbk)
    for (int tyy = 0; tyy < TY; ++tyy)
      output_tiles(M, j->bias, j->res, j->y, kbk, tyy, 0, TX, tyy * TX);
}

static void run(struct job* j) {
  wpk_pool_run(input_item, j, CB * TY);
  wpk_pool_run(output_item, j, KB / KW);
}
"""


def _transform_tile(s: WinogradShape) -> str:
    """One tile's M values -> its m x m outputs o[i][j] (both layouts)."""
    a = s.alpha
    out_tf = "\n".join(_transform(MATRICES[s.m]["AT"], "q", "o", a))
    return f"""    const int t = row0 + txx - txa;
    __m512 q[{a}][{a}];
    for (int i = 0; i < {a}; ++i)
      for (int j = 0; j < {a}; ++j)
        q[i][j] = _mm512_load_ps(M + ((size_t)(i * {a} + j) * VR + t) * KP + k0);
{out_tf}"""


# output channel block kbk's bias, one vector (both layouts)
_BIAS_BLOCK = """  const int k0 = kbk * 16;
  const int nk = KOUT - k0 < 16 ? KOUT - k0 : 16;
  const __m512 b = bias ? _mm512_maskz_loadu_ps((__mmask16)((1u << nk) - 1u), bias + k0)
                        : _mm512_setzero_ps();"""


def _nchwc_pack_row(s: WinogradShape) -> str:
    """A pixel's 16 channels are one vector: no transpose on the way in."""
    pad_l = s.pads[1]
    return f"""    for (int x0 = ix_lo; x0 < ix_hi; ++x0)
      _mm512_store_ps(lp[r][x0 + {pad_l}], _mm512_loadu_ps(x + (((size_t)cbk * H + iy) * W + x0) * 16));"""


def _nchwc_output_body(s: WinogradShape) -> str:
    """Blocked output: no transpose on the way out."""
    m = s.m
    bias_block, transform_tile = _BIAS_BLOCK, _transform_tile(s)
    residual_c = "v = _mm512_add_ps(v, _mm512_loadu_ps(res + off));" if s.residual else ""
    relu = activations.avx512(s.relu, "v")
    return f"""{bias_block}
  for (int txx = txa; txx < txb; ++txx) {{
{transform_tile}
    for (int i = 0; i < {m}; ++i) {{
      const int oy = tyy * {m} + i;
      if (oy >= OH) break;
      for (int j = 0; j < {m}; ++j) {{
        const int ox = txx * {m} + j;
        if (ox >= OW) break;
        const size_t off = (((size_t)kbk * OH + oy) * OW + ox) * 16;
        __m512 v = _mm512_add_ps(o[i][j], b);
        {residual_c}
        {relu}
        _mm512_storeu_ps(y + off, v);
      }}
    }}
  }}
}}"""


def _nchw_pack_row(s: WinogradShape) -> str:
    """Sixteen channels of a row transposed to pixel-major."""
    pad_l = s.pads[1]
    return f"""    for (int x0 = ix_lo; x0 < ix_hi; x0 += 16) {{
      const int nx = ix_hi - x0 < 16 ? ix_hi - x0 : 16;
      const __mmask16 mx = (__mmask16)((1u << nx) - 1u);
      __m512 rr[16];
      for (int c = 0; c < 16; ++c)
        rr[c] = c < nc ? _mm512_maskz_loadu_ps(mx, x + ((size_t)(c0 + c) * H + iy) * W + x0)
                       : _mm512_setzero_ps();
      tr16(rr);
      for (int q = 0; q < nx; ++q) _mm512_store_ps(lp[r][x0 + {pad_l} + q], rr[q]);
    }}"""


def _nchw_output_body(s: WinogradShape) -> str:
    """The tiles' outputs transposed back to NCHW rows, the residual added."""
    m = s.m
    bias_block, transform_tile = _BIAS_BLOCK, _transform_tile(s)
    residual = "v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mx, res + off));" \
        if s.residual else ""
    relu = activations.avx512(s.relu, "v")
    return f"""  float lb[{m}][TX * {m} + 16][16] __attribute__((aligned(64)));
{bias_block}
  for (int txx = txa; txx < txb; ++txx) {{
{transform_tile}
    for (int i = 0; i < {m}; ++i)
      for (int j = 0; j < {m}; ++j)
        _mm512_store_ps(lb[i][(txx - txa) * {m} + j], _mm512_add_ps(o[i][j], b));
  }}
  const int x_end = txb * {m} < OW ? txb * {m} : OW;
  for (int i = 0; i < {m}; ++i) {{
    const int oy = tyy * {m} + i;
    if (oy >= OH) break;
    for (int x0 = txa * {m}; x0 < x_end; x0 += 16) {{
      const int nx = x_end - x0 < 16 ? x_end - x0 : 16;
      const __mmask16 mx = (__mmask16)((1u << nx) - 1u);
      __m512 rr[16];
      for (int q2 = 0; q2 < 16; ++q2) rr[q2] = _mm512_load_ps(lb[i][x0 - txa * {m} + q2]);
      tr16(rr);
      for (int k = 0; k < nk; ++k) {{
        const size_t off = ((size_t)(k0 + k) * OH + oy) * OW + x0;
        __m512 v = rr[k];
        {residual}
        {relu}
        _mm512_mask_storeu_ps(y + off, mx, v);
      }}
    }}
  }}
}}"""


def winograd_shape(params: dict) -> WinogradShape:
    return WinogradShape(c=params["c"], k=params["k"], h=params["h"], w=params["w"],
                         pads=tuple(params["pads"]), m=params["m"], relu=params["relu"],
                         residual=params["residual"], threads=params["threads"],
                         split=params["split"], layout=params.get("layout", "nchw"))


def node_consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes reading it (what `winograd_spec` needs to see whether an Add
    or Relu after a Conv can be fused into the kernel)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def conv_pattern(conv: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                 graph_outputs: set[str]) -> tuple[list[onnx.NodeProto], str | None, str]:
    """Conv, then a sole-consumer Add (of a second tensor) and/or Relu to fuse:
    (fused nodes, residual tensor or None, output tensor)."""
    nodes, residual, out = [conv], None, conv.output[0]

    def sole(name: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        if len(users) != 1 or name in graph_outputs:
            return None
        return users[0]

    nxt = sole(out)
    if nxt is not None and nxt.op_type == "Add" and nxt.domain in ("", "ai.onnx") and \
            len(nxt.input) == 2 and nxt.input[0] != nxt.input[1]:
        residual = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
        nodes.append(nxt)
        out = nxt.output[0]
        nxt = sole(out)
    if nxt is not None and nxt.op_type == "Relu":
        nodes.append(nxt)
        out = nxt.output[0]
    return nodes, residual, out


def winograd_spec(conv: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                  graph_outputs: set[str], shapes: dict[str, tuple[int, ...]],
                  consts: dict[str, np.ndarray], m: int = 4, split: str = "tiles",
                  threads: int | None = None):
    """A KernelSpec running `conv` (3x3, stride 1, dilation 1, group 1, fp32, constant
    weights) and the Add / Relu after it as one Winograd kernel, or None."""
    from wpk.optimizer.kernels import KernelSpec, _pads

    if not _winograd_conv(conv, shapes, consts):
        return None
    weight = consts[conv.input[1]]
    bias = len(conv.input) > 2 and bool(conv.input[2])
    _, c, h, w = shapes[conv.input[0]]
    pads = _pads(conv, (h, w), (3, 3), (1, 1), (1, 1))
    if min(pads) < 0 or max(pads) > 2 or h + pads[0] + pads[2] < 3 or w + pads[1] + pads[3] < 3:
        return None
    oh, ow = h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2
    nodes, residual, out = _fused_tail(conv, consumers, graph_outputs, shapes, consts,
                                       (1, weight.shape[0], oh, ow))
    relu = nodes[-1].op_type == "Relu"
    name = "w_" + "".join(ch if ch.isalnum() else "_" for ch in conv.name or conv.output[0])
    params = dict(c=c, k=int(weight.shape[0]), h=h, w=w, pads=pads, m=m, relu=relu,
                  residual=residual is not None, split=split,
                  threads=threads or os.cpu_count() or 1, name=name)
    weights = {"Wt": weight.astype(np.float32)}
    if bias:
        weights["B"] = consts[conv.input[2]].astype(np.float32)
    sources = [conv.input[0], "weight:Wt"] + (["weight:B"] if bias else []) + \
        ([residual] if residual else []) + [out]
    return KernelSpec("winograd", params, sources, out, "+".join(n.name for n in nodes),
                      weights=weights)


def _winograd_conv(conv: onnx.NodeProto, shapes: dict[str, tuple[int, ...]],
                   consts: dict[str, np.ndarray]) -> bool:
    """Whether `conv` is one the Winograd kernel computes (padding aside): a plain 3x3
    stride-1 undilated ungrouped Conv of one image, its weights (and bias) constant."""
    from wpk.optimizer.kernels import _attr

    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or \
            conv.input[1] not in consts or conv.input[0] not in shapes:
        return False
    weight = consts[conv.input[1]]
    x_shape = shapes[conv.input[0]]
    if weight.ndim != 4 or weight.shape[2:] != (3, 3) or len(x_shape) != 4 or x_shape[0] != 1:
        return False
    if tuple(_attr(conv, "strides", [1, 1])) != (1, 1) or \
            tuple(_attr(conv, "dilations", [1, 1])) != (1, 1) or _attr(conv, "group", 1) != 1:
        return False
    bias = len(conv.input) > 2 and bool(conv.input[2])
    return not (bias and conv.input[2] not in consts)


def _fused_tail(conv: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                graph_outputs: set[str], shapes: dict[str, tuple[int, ...]],
                consts: dict[str, np.ndarray], y_shape: tuple[int, ...]
                ) -> tuple[list[onnx.NodeProto], str | None, str]:
    """`conv_pattern`, less a residual Add whose other operand is not a computed tensor of
    the Conv's output shape `y_shape`: broadcast or constant adds stay in ONNX Runtime (a
    Relu straight after the Conv is still fused)."""
    nodes, residual, out = conv_pattern(conv, consumers, graph_outputs)
    if residual is not None and (residual in consts or shapes.get(residual) != y_shape):
        nodes, residual = nodes[:1], None
        out = conv.output[0]
        nxt = consumers.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type == "Relu" and out not in graph_outputs:
            nodes.append(nxt[0])
            out = nxt[0].output[0]
    return nodes, residual, out


class WinogradKernel:
    """A compiled Winograd kernel with its transformed weights: call with the activations."""

    def __init__(self, spec) -> None:
        from wpk.errors import WpkError
        from wpk.optimizer.build import CKernel
        from wpk.optimizer.pool import load_pool

        ok, why = supported()
        if not ok:
            raise WpkError(f"cannot load generated kernel {spec.node}: {why}")
        self.spec = spec
        self.shape = winograd_shape(spec.params)
        name = spec.params.get("name", "winograd")
        self.source = lower(self.shape, name)
        load_pool()
        self.kernel = CKernel(self.source, name, 5)
        self.u = transform_weights(spec.weights["Wt"], self.shape.m)
        self.bias = np.ascontiguousarray(spec.weights["B"], np.float32) \
            if "B" in spec.weights else None
        oh, ow = self.shape.out_hw
        self.out_shape = (1, self.shape.k, oh, ow)
        self.x_name = spec.sources[0]
        self.res_name = spec.sources[-2] if self.shape.residual else None
        self.activations = [self.x_name] + ([self.res_name] if self.res_name else [])
        self._fn = self.kernel.raw
        self._u_ptr = self.u.ctypes.data
        self._b_ptr = None if self.bias is None else self.bias.ctypes.data

    def __call__(self, env) -> np.ndarray:
        x = env[self.x_name]
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, np.float32)
        res = None
        if self.res_name is not None:
            res = env[self.res_name]
            if res.dtype != np.float32 or not res.flags.c_contiguous:
                res = np.ascontiguousarray(res, np.float32)
        out = np.empty(self.out_shape, np.float32)
        self._fn(x.ctypes.data, self._u_ptr, self._b_ptr,
                 None if res is None else res.ctypes.data, out.ctypes.data)
        return out
