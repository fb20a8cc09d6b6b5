"""Depthwise KxK convolution in ONNX Runtime's NCHWc layout, optionally fused with the 1x1
expansion convolution before it (a MobileNet inverted residual's first two layers), generated as
C with AVX-512 intrinsics, one kernel per shape, run as a custom operator (`ort_ops.py`).

Why: in an inverted residual the 1x1 expansion writes the block's largest tensor (4-6x the
channels, at the higher resolution) only for the depthwise convolution to read it once. ONNX
Runtime runs the two as separate NCHWc nodes, so that tensor goes through L3 and back, and its
depthwise kernel is memory-bound. Fused, the expanded rows live in a ring of K rows per
hidden-channel block in L1: they are computed once each (band by band, top to bottom),
consumed by the depthwise taps, and never stored.

Work items: (group of HB hidden blocks, band of output rows); a band recomputes the K - S
expanded rows its neighbour also needs, so bands are only used where groups are too few to
keep every core busy. Ring rows carry the left/right zero padding, so the depthwise taps need
no column checks; padded rows (top/bottom) are skipped.

Layouts: X [Cin/16][H][W][16] (padded channels are multiplied by zero weights), packed
parameters (`pack_parameters`), Y [C/16][OH][OW][16]; hidden channels a multiple of 16.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wpk.optimizer import activations

BLOCK = 16
DW_PIXELS = 8          # depthwise output pixels per register block
EXPAND_PIXELS = {1: 14, 2: 12, 4: 7}   # expansion pixels per register block, by hidden blocks
PROJECT_PIXELS = {1: 14, 2: 14, 3: 8, 4: 6}   # projection pixels per block, by output blocks
L1_BUDGET = 32 * 1024  # bytes of freshly expanded rows a work item may leave for its taps


@dataclass(frozen=True)
class DepthwiseShape:
    c: int                               # channels of the depthwise conv (a multiple of 16)
    h: int
    w: int
    cin: int = 0                         # channels into the fused 1x1 expansion (0: none)
    kernel: int = 3
    stride: int = 1
    pads: tuple[int, int, int, int] = (1, 1, 1, 1)   # top, left, bottom, right
    # activations (`activations.py`: "relu", "clip:LO:HI" or ""; booleans read as Relu/none)
    relu_expand: str | bool = "relu"
    relu: str | bool = ""
    threads: int = 2
    hb: int = 1                          # hidden blocks per expansion register tile (and per
    #                                      work item where the projection is not fused)
    cout: int = 0                        # channels of the fused 1x1 projection (0: none)
    residual: bool = False               # the projection adds a residual input R
    relu_project: str | bool = ""
    bands: int = 0                       # row bands (work items) where the projection is
    #                                      fused; 0: two per thread

    @property
    def cout_padded(self) -> int:
        return -(-self.cout // BLOCK) * BLOCK

    @property
    def out_hw(self) -> tuple[int, int]:
        t, l, b, r = self.pads
        return ((self.h + t + b - self.kernel) // self.stride + 1,
                (self.w + l + r - self.kernel) // self.stride + 1)

    @property
    def cin_padded(self) -> int:
        return -(-self.cin // BLOCK) * BLOCK

    @property
    def x_channels(self) -> int:
        """Channels of X as ONNX Runtime stores it (whole blocks)."""
        return self.cin_padded if self.cin else self.c

    @property
    def out_channels(self) -> int:
        """Channels of Y as ONNX Runtime stores it."""
        return self.cout_padded if self.cout else self.c

    @property
    def parameter_count(self) -> int:
        expand = self.c * self.cin_padded + self.c if self.cin else 0
        project = self.cout_padded * self.c + self.cout_padded if self.cout else 0
        return expand + self.c * self.kernel * self.kernel + project

    @property
    def flops(self) -> float:
        oh, ow = self.out_hw
        return 2.0 * self.c * (oh * ow * (self.kernel * self.kernel + self.cout)
                               + self.h * self.w * self.cin)


def depthwise_shape(params: dict) -> DepthwiseShape:
    return DepthwiseShape(c=params["c"], h=params["h"], w=params["w"], cin=params.get("cin", 0),
                          kernel=params.get("kernel", 3), stride=params.get("stride", 1),
                          pads=tuple(params["pads"]),
                          relu_expand=activations.normalize(params.get("relu_expand", True)),
                          relu=activations.normalize(params.get("relu", False)),
                          threads=params.get("threads", 2),
                          hb=params.get("hb", 1), cout=params.get("cout", 0),
                          residual=params.get("residual", False),
                          relu_project=activations.normalize(params.get("relu_project", False)),
                          bands=params.get("bands", 0))


def pack_parameters(shape: DepthwiseShape, depthwise: np.ndarray,
                    expand: np.ndarray | None = None, expand_bias: np.ndarray | None = None,
                    project: np.ndarray | None = None,
                    project_bias: np.ndarray | None = None) -> np.ndarray:
    """One flat float32 array: the expansion's weights [C/16][Cin padded][16] (zero rows for
    padded input channels) and bias [C], the depthwise weights [C/16][K*K][16], then the
    projection's weights [Cout/16][C][16] and bias [Cout] (padded output channels zero)."""
    parts = []
    c, kk = shape.c, shape.kernel * shape.kernel
    if shape.cin:
        w = np.zeros((shape.cin_padded, c), np.float32)
        w[:shape.cin] = expand.reshape(c, shape.cin).T
        parts.append(w.reshape(shape.cin_padded, c // BLOCK, BLOCK).transpose(1, 0, 2).ravel())
        parts.append(np.zeros(c, np.float32) if expand_bias is None
                     else expand_bias.astype(np.float32).ravel())
    parts.append(depthwise.reshape(c // BLOCK, BLOCK, kk).transpose(0, 2, 1).ravel())
    if shape.cout:
        w = np.zeros((shape.cout_padded, c), np.float32)
        w[:shape.cout] = project.reshape(shape.cout, c)
        parts.append(w.reshape(shape.cout_padded // BLOCK, BLOCK, c).transpose(0, 2, 1).ravel())
        b = np.zeros(shape.cout_padded, np.float32)
        if project_bias is not None:
            b[:shape.cout] = project_bias.ravel()
        parts.append(b)
    return np.ascontiguousarray(np.concatenate(parts), np.float32)


def balanced_tile(width: int, most: int) -> int:
    """Pixels per register block: as few blocks as `most` allows, all of (nearly) one size
    (the last block overlaps its neighbour instead of running short)."""
    return -(-width // -(-width // most))


def bands_for(shape: DepthwiseShape) -> int:
    """Row bands per group: enough items for two per core, each band at least 4 rows (or
    `shape.bands` where the projection is fused: every item then holds all channels)."""
    if shape.cout and shape.bands:
        return max(1, min(shape.bands, shape.out_hw[0]))
    groups = 1 if shape.cout else shape.c // BLOCK // shape.hb
    oh = shape.out_hw[0]
    want = -(-2 * shape.threads // groups)
    return max(1, min(want, oh // 4 or 1))


def _expand_row(s: DepthwiseShape) -> str:
    """C of `expand_row(x, p, iy, ring_row)`: expansion of input row iy for the item's HB
    hidden blocks into a ring row [HB][WP][16] (data columns from PL)."""
    px = balanced_tile(s.w, EXPAND_PIXELS.get(s.hb, max(1, 24 // s.hb)))
    relu = activations.avx512(s.relu_expand)
    if not s.cin:   # no expansion: copy the row into the padded ring
        return """
static inline void expand_row(const float* __restrict__ x, const float* __restrict__ p, int g,
                              int iy, float* __restrict__ ring_row) {
  (void)p;
  for (int j = 0; j < HB; ++j) {
    const float* src = x + (((size_t)(g * HB + j) * H + iy) * W) * 16;
    float* dst = ring_row + ((size_t)j * WP + PL) * 16;
    for (int q = 0; q < W; ++q) _mm512_store_ps(dst + q * 16, _mm512_loadu_ps(src + q * 16));
  }
}"""
    return f"""
#define PX {px}
static inline void expand_tile(const float* __restrict__ x, const float* __restrict__ we,
                               const float* __restrict__ be, int iy, int q0,
                               float* __restrict__ ring_row) {{
  __m512 acc[PX][HB];
  for (int j = 0; j < HB; ++j) {{
    const __m512 b = _mm512_loadu_ps(be + j * 16);
    for (int q = 0; q < PX; ++q) acc[q][j] = b;
  }}
  for (int cb = 0; cb < CINB; ++cb) {{
    const float* __restrict__ xr = x + (((size_t)cb * H + iy) * W + q0) * 16;
    const float* __restrict__ wr = we + (size_t)cb * 16 * 16;
    const int channels = cb < CINB - 1 ? 16 : CIN_LAST;   /* padded channels are skipped */
    for (int ci = 0; ci < channels; ++ci) {{
      __m512 wv[HB];
      for (int j = 0; j < HB; ++j) wv[j] = _mm512_loadu_ps(wr + (size_t)j * CINP * 16 + ci * 16);
      for (int q = 0; q < PX; ++q) {{
        const __m512 xv = _mm512_set1_ps(xr[q * 16 + ci]);
        for (int j = 0; j < HB; ++j) acc[q][j] = _mm512_fmadd_ps(xv, wv[j], acc[q][j]);
      }}
    }}
  }}
  for (int j = 0; j < HB; ++j)
    for (int q = 0; q < PX; ++q) {{
      __m512 a = acc[q][j];
      {relu}
      _mm512_store_ps(ring_row + ((size_t)j * WP + PL + q0 + q) * 16, a);
    }}
}}

static inline void expand_row(const float* __restrict__ x, const float* __restrict__ p, int g,
                              int iy, float* __restrict__ ring_row) {{
  const float* we = p + (size_t)g * HB * CINP * 16;
  const float* be = p + (size_t)C * CINP + g * HB * 16;
  int q0 = 0;
  for (; q0 + PX <= W; q0 += PX) expand_tile(x, we, be, iy, q0, ring_row);
  if (q0 < W) expand_tile(x, we, be, iy, W - PX, ring_row);   /* overlapping last tile */
}}"""


def _project_tile(s: DepthwiseShape) -> str:
    """C of `project_row`: the 1x1 projection of one row of depthwise outputs (all hidden
    channels, in L1) to the output channels, plus bias and residual, stored to Y."""
    if not s.cout:
        return ""
    cob = s.cout_padded // BLOCK
    co = max(d for d in (1, 2, 3, 4) if cob % d == 0)
    pxp = balanced_tile(s.out_hw[1], PROJECT_PIXELS[co])
    relu = activations.avx512(s.relu_project)
    residual = "a = _mm512_add_ps(a, _mm512_loadu_ps(r + off));" if s.residual else ""
    return f"""
#define COB {cob}
#define CO {co}
#define PXP {pxp}
static inline void project_tile(const float* __restrict__ dwrow, const float* __restrict__ wp,
                                const float* __restrict__ bp, const float* __restrict__ r,
                                float* __restrict__ y, int oy, int ob0, int ox0) {{
  (void)r;
  __m512 acc[PXP][CO];
  for (int j = 0; j < CO; ++j) {{
    const __m512 b = _mm512_loadu_ps(bp + (ob0 + j) * 16);
    for (int q = 0; q < PXP; ++q) acc[q][j] = b;
  }}
  for (int cb = 0; cb < C / 16; ++cb) {{
    const float* __restrict__ dr = dwrow + ((size_t)cb * OW + ox0) * 16;
    const float* __restrict__ wr = wp + ((size_t)ob0 * C + cb * 16) * 16;
    for (int ci = 0; ci < 16; ++ci) {{
      __m512 wv[CO];
      for (int j = 0; j < CO; ++j) wv[j] = _mm512_loadu_ps(wr + ((size_t)j * C + ci) * 16);
      for (int q = 0; q < PXP; ++q) {{
        const __m512 xv = _mm512_set1_ps(dr[q * 16 + ci]);
        for (int j = 0; j < CO; ++j) acc[q][j] = _mm512_fmadd_ps(xv, wv[j], acc[q][j]);
      }}
    }}
  }}
  for (int j = 0; j < CO; ++j)
    for (int q = 0; q < PXP; ++q) {{
      const size_t off = (((size_t)(ob0 + j) * OH + oy) * OW + ox0 + q) * 16;
      __m512 a = acc[q][j];
      {residual}
      {relu}
      _mm512_storeu_ps(y + off, a);
    }}
}}

static inline void project_row(const float* __restrict__ dwrow, const float* __restrict__ p,
                               const float* __restrict__ r, float* __restrict__ y, int oy) {{
  const float* wp = p + PROJECT_OFFSET;
  const float* bp = wp + (size_t)COB * 16 * C;
  for (int ob0 = 0; ob0 < COB; ob0 += CO) {{
    int ox = 0;
    for (; ox + PXP <= OW; ox += PXP) project_tile(dwrow, wp, bp, r, y, oy, ob0, ox);
    if (ox < OW) project_tile(dwrow, wp, bp, r, y, oy, ob0, OW - PXP);
  }}
}}"""


@dataclass(frozen=True)
class _Layout:
    """The sizes the generated source of one shape is written with."""
    oh: int
    ow: int
    wp: int                 # padded input row width
    pixels: int             # depthwise output pixels per register block
    bands: int
    band_rows: int
    item_blocks: int        # blocks of hidden channels per work item
    dw_offset: int          # where the depthwise weights start in the parameters
    scratch: int            # floats of per-thread scratch
    interleave: bool        # expand and convolve one group of blocks at a time


def _layout(s: DepthwiseShape) -> _Layout:
    oh, ow = s.out_hw
    k = s.kernel
    _, left, _, right = s.pads
    wp = s.w + left + right
    bands = bands_for(s)
    # blocks of hidden channels per work item: all of them where the projection is fused
    item_blocks = s.c // BLOCK if s.cout else s.hb
    # the new expanded rows of all the item's blocks would not stay in L1 until the
    # depthwise taps read them: expand and convolve one group of blocks at a time instead
    interleave = item_blocks * s.stride * wp * BLOCK * 4 > L1_BUDGET
    return _Layout(oh=oh, ow=ow, wp=wp, pixels=balanced_tile(ow, DW_PIXELS), bands=bands,
                   band_rows=-(-oh // bands), item_blocks=item_blocks,
                   dw_offset=s.c * s.cin_padded + s.c if s.cin else 0,
                   scratch=k * item_blocks * wp * BLOCK + (s.c * ow if s.cout else 0),
                   interleave=interleave)


def lower(shape: DepthwiseShape, name: str) -> str:
    """C source of `void name(x, parameters, bias, residual, y)` for `shape`."""
    s = shape
    assert s.c % BLOCK == 0 and (s.c // BLOCK) % s.hb == 0, "whole hidden blocks per item"
    layout = _layout(s)
    return (_header(s, layout) + f"{_expand_row(s)}\n{_project_tile(s)}\n\n"
            + _dw_tile(s) + "\n\n" + _item_fn(s, layout) + "\n\n" + _entry(s, layout, name))


def _header(s: DepthwiseShape, layout: _Layout) -> str:
    """Includes, the pool and scratch hooks, the job struct and the shape's #defines."""
    oh, ow, wp, k, st = layout.oh, layout.ow, layout.wp, s.kernel, s.stride
    top, left = s.pads[0], s.pads[1]
    pixels, bands, band_rows = layout.pixels, layout.bands, layout.band_rows
    item_blocks, dw_offset = layout.item_blocks, layout.dw_offset
    scratch, interleave = layout.scratch, layout.interleave
    return f"""#include <immintrin.h>
#include <stddef.h>
#include <stdlib.h>
{activations.C_HELPERS}
extern void wpk_pool_run(void (*fn)(int, int, void*), void* ctx, int total);
extern float* wpk_thread_scratch(size_t floats);
extern void wpk_kernel_failed(const char* why);
struct job {{ const float* x; const float* p; const float* b; const float* r; float* y;
             int failed; }};
#define C {s.c}
#define CINB {s.cin_padded // BLOCK}
#define CINP {s.cin_padded}
#define CIN_LAST {s.cin - (s.cin_padded - BLOCK) if s.cin else 0}
#define H {s.h}
#define W {s.w}
#define OH {oh}
#define OW {ow}
#define K {k}
#define S {st}
#define PT {top}
#define PL {left}
#define WP {wp}
#define HB {s.hb}
#define ITEM_BLOCKS {item_blocks}
#define P {pixels}
#define BANDS {bands}
#define BAND_ROWS {band_rows}
#define PROJECT_OFFSET {dw_offset + s.c * k * k}
#define SCRATCH {scratch}
#define INTERLEAVE {int(interleave)}
"""


def _dw_tile(s: DepthwiseShape) -> str:
    """The depthwise register tile, its activation fused."""
    relu = activations.avx512(s.relu)
    return f"""\
/* output pixels ox..ox+P-1 of row oy, hidden block j, from the ring rows of taps ky0..ky1-1 */
static inline void dw_tile(float* const* rows, int ky0, int ky1, const __m512* wv, __m512 bias,
                           int j, int ox, float* __restrict__ out) {{
  __m512 acc[P];
  for (int q = 0; q < P; ++q) acc[q] = bias;
  for (int ky = ky0; ky < ky1; ++ky) {{
    const float* __restrict__ row = rows[ky] + ((size_t)j * WP + ox * S) * 16;
    for (int kx = 0; kx < K; ++kx)
      for (int q = 0; q < P; ++q)
        acc[q] = _mm512_fmadd_ps(_mm512_load_ps(row + (q * S + kx) * 16), wv[ky * K + kx],
                                 acc[q]);
  }}
  for (int q = 0; q < P; ++q) {{
    __m512 a = acc[q];
    {relu}
    _mm512_storeu_ps(out + q * 16, a);
  }}
}}"""


def _item_fn(s: DepthwiseShape, layout: _Layout) -> str:
    """One work item: a band of rows of one group of hidden blocks (all of them where the
    projection is fused), through the ring of expanded rows."""
    dw_offset = layout.dw_offset
    if s.cout:
        dw_out = "dwrow + (size_t)j * OW * 16"
        finish_row = "project_row(dwrow, jb->p, jb->r, jb->y, oy);"
    else:
        dw_out = "jb->y + ((size_t)cb * OH + oy) * OW * 16"
        finish_row = ""
    return f"""static void item_fn(int item, int slot, void* ctx) {{
  (void)slot;
  struct job* jb = (struct job*)ctx;
  const int g = item / BANDS, band = item % BANDS;
  const int oy0 = band * BAND_ROWS;
  const int oy1 = oy0 + BAND_ROWS < OH ? oy0 + BAND_ROWS : OH;
  /* per thread, kept between calls: the ring of K expanded rows (+ a row of depthwise
     outputs) */
  float* thread_scratch = wpk_thread_scratch(SCRATCH);
  if (!thread_scratch) {{
    __atomic_store_n(&jb->failed, 1, __ATOMIC_RELAXED);
    return;
  }}
  float* ring[K];
  for (int r = 0; r < K; ++r) ring[r] = thread_scratch + (size_t)r * ITEM_BLOCKS * WP * 16;
  float* __restrict__ dwrow = thread_scratch + (size_t)K * ITEM_BLOCKS * WP * 16;
  (void)dwrow;
  for (int r = 0; r < K; ++r)             /* the padding columns stay zero */
    for (int j = 0; j < ITEM_BLOCKS; ++j) {{
      for (int q = 0; q < PL; ++q)
        _mm512_store_ps(ring[r] + ((size_t)j * WP + q) * 16, _mm512_setzero_ps());
      for (int q = PL + W; q < WP; ++q)
        _mm512_store_ps(ring[r] + ((size_t)j * WP + q) * 16, _mm512_setzero_ps());
    }}
  const float* dw = jb->p + {dw_offset};
  int next_row = oy0 * S - PT;            /* first input row not yet in the ring */
  if (next_row < 0) next_row = 0;
  for (int oy = oy0; oy < oy1; ++oy) {{
    const int iy0 = oy * S - PT;
    const int ky0 = iy0 < 0 ? -iy0 : 0;
    const int ky1 = iy0 + K > H ? H - iy0 : K;
    float* rows[K];
    for (int ky = 0; ky < K; ++ky) rows[ky] = ring[((iy0 + ky) % K + K) % K];
#if !INTERLEAVE
    for (int r = next_row; r < iy0 + ky1; ++r)
      for (int gg = 0; gg < ITEM_BLOCKS / HB; ++gg)
        expand_row(jb->x, jb->p, g * (ITEM_BLOCKS / HB) + gg, r,
                   ring[r % K] + (size_t)gg * HB * WP * 16);
#endif
    for (int j = 0; j < ITEM_BLOCKS; ++j) {{
#if INTERLEAVE   /* group by group: its new expanded rows, then its depthwise outputs */
      if (j % HB == 0)
        for (int r = next_row; r < iy0 + ky1; ++r)
          expand_row(jb->x, jb->p, g * (ITEM_BLOCKS / HB) + j / HB, r,
                     ring[r % K] + (size_t)j * WP * 16);
#endif
      const int cb = g * ITEM_BLOCKS + j;
      __m512 wv[K * K];
      for (int t = 0; t < K * K; ++t) wv[t] = _mm512_loadu_ps(dw + ((size_t)cb * K * K + t) * 16);
      const __m512 bias = jb->b ? _mm512_loadu_ps(jb->b + cb * 16) : _mm512_setzero_ps();
      float* __restrict__ out = {dw_out};
      int ox = 0;
      for (; ox + P <= OW; ox += P) dw_tile(rows, ky0, ky1, wv, bias, j, ox, out + ox * 16);
      if (ox < OW) dw_tile(rows, ky0, ky1, wv, bias, j, OW - P, out + (OW - P) * 16);
    }}
    if (next_row < iy0 + ky1) next_row = iy0 + ky1;
    {finish_row}
  }}
}}"""


def _entry(s: DepthwiseShape, layout: _Layout, name: str) -> str:
    """The kernel's entry point: one pool run over the work items."""
    item_blocks = layout.item_blocks
    return f"""void {name}(const float* x, const float* p, const float* bias, const float* residual,
            float* y) {{
  struct job jb = {{x, p, bias, residual, y, 0}};
  wpk_pool_run(item_fn, &jb, {s.c // BLOCK // item_blocks} * BANDS);
  if (jb.failed) wpk_kernel_failed("out of memory for its scratch rows");
}}
"""
