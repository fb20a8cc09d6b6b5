"""Direct convolution in ONNX Runtime's NCHWc layout that skips all-zero weight rows,
generated as C with AVX-512 intrinsics and run as a custom operator (`ort_ops.py`).

Why: a convolution is a GEMM whose reduction runs over (input channel, kernel row, kernel
column). When a weight is pruned tile-wise (Guo et al., SC 2020: whole reduction rows zero
inside a tile of output channels), block-wise, or channel-wise, every output block of 16
channels has reduction rows that are zero in all 16 of its channels. Those rows cost nothing
here: each output block (or pair of blocks with the same rows) keeps only its non-zero rows,
so the work falls with the sparsity while every load and FMA stays a full vector. A dense
weight keeps every row and runs as a plain register-blocked direct convolution.

What it cannot use: N:M patterns (2:4) zero different rows in each output channel, so the
union over 16 channels is nearly dense (a CPU has no sparse tensor cores); the rows kept say
so before anything is compiled (`kept_fraction`).

Layouts: X [C/16][H][W][16], Y and R [K/16][OH][OW][16]. Register tile: P output pixels of one
row times B output blocks (B = 2 where two neighbouring blocks keep the same rows), one
broadcast of an input value per pixel and kept row, one weight vector per block and kept row.
Padding: the input is copied once into a zero-bordered buffer (the calling thread's scratch),
so the hot loop has no bounds checks. A 1x1 stride-1 unpadded convolution runs over its
pixels as one flat row.

A GEMM (MatMul or Gemm with a constant weight) is the same kernel in the "rows" layout: X
[M, K] and Y [M, N] row-major, a pixel is a row of X (M = w, K = c, N = k), a reduction row is a
column of X; its weight is passed as (N, K, 1, 1).

Portable: the source includes `portable_simd.HEADER`, so it also compiles without AVX-512
(AVX2, SSE, NEON), where a 16-float vector is two, four or four registers: `portable=True`
walks a group's blocks one at a time, `PORTABLE_TILE_PIXELS` pixels per tile, so that the
accumulators fit (the packed weights are the same). Only the rows layout is offered there
(`ort_ops.PORTABLE_OPS`): ONNX Runtime's NCHWc blocks are 16 channels on AVX-512 only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wpk.optimizer import activations, portable_simd

BLOCK = 16
# output blocks a tile may share its broadcasts between, and its pixels for each count: at
# most 24 accumulators of AVX-512's 32 registers, the rest for weights and the broadcast
MAX_BLOCKS = 4
TILE_PIXELS = {1: 14, 2: 12, 4: 6}
# the same without AVX-512, where 16 registers of 32 bytes (AVX2) or 32 of 16 (NEON) hold 8
# 16-float vectors: one output block at a time (a group's blocks in turn), 6 pixels, so 6
# accumulators leave room for the weight and the broadcast
PORTABLE_TILE_PIXELS = 6
# work items per thread, so that a late thread still finds work
ITEMS_PER_THREAD = 4
# packed weights a work item walks its rows with (an L2's share)
WEIGHT_CHUNK_BYTES = 256 * 1024
# weights of the rows a tile walks before it moves on (partial sums kept in Y): an L1's share,
# so that every tile of a band reuses them from L1
ROW_CHUNK_BYTES = 16 * 1024


@dataclass(frozen=True)
class DirectShape:
    """One convolution: channels c -> k (multiples of 16), input h x w, kernel kh x kw,
    strides, pads (top, left, bottom, right), fused activation and residual."""

    c: int
    k: int
    h: int
    w: int
    kh: int
    kw: int
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    act: str = ""
    residual: bool = False
    threads: int = 2
    layout: str = "nchwc"     # or "rows": a GEMM, X [w, c] and Y [w, k] row-major (module doc)

    @property
    def rows_layout(self) -> bool:
        return self.layout == "rows"

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.rows_layout:
            return 1, self.w
        oh = (self.h + self.pads[0] + self.pads[2] - self.kh) // self.stride[0] + 1
        ow = (self.w + self.pads[1] + self.pads[3] - self.kw) // self.stride[1] + 1
        return oh, ow

    @property
    def padded(self) -> bool:
        return any(self.pads)

    @property
    def flat(self) -> bool:
        """A 1x1 stride-1 unpadded convolution on rows too short for a full tile: its
        pixels are walked as one row."""
        return self.rows_layout or (self.kh, self.kw, *self.stride) == (1, 1, 1, 1) and \
            not self.padded and self.out_hw[1] < 12

    @property
    def input_hw(self) -> tuple[int, int]:
        """Rows and columns of the buffer the kernel reads (padded, or flat)."""
        if self.flat:
            return 1, self.h * self.w
        return self.h + self.pads[0] + self.pads[2], self.w + self.pads[1] + self.pads[3]

    @property
    def rows_cols(self) -> tuple[int, int]:
        """Output rows and pixels per row as the kernel walks them."""
        oh, ow = self.out_hw
        return (1, oh * ow) if self.flat else (oh, ow)

    @property
    def steps(self) -> tuple[int, int, str]:
        """Floats between neighbouring pixels of a tile in X and in Y, and (C expression)
        between neighbouring output blocks in Y."""
        if self.rows_layout:
            return self.c, self.k, "16"
        return (1 if self.flat else self.stride[1]) * BLOCK, BLOCK, "(long)ROWS * COLS * 16"


@dataclass(frozen=True)
class Group:
    """Output blocks first .. first+blocks-1 and the reduction rows they keep, as offsets
    into the input buffer relative to a pixel."""

    first: int
    blocks: int
    offsets: tuple[int, ...]
    rows: tuple[int, ...] = field(repr=False)   # reduction indices (c, r, s) flattened


def direct_shape(params: dict) -> DirectShape:
    return DirectShape(c=params["c"], k=params["k"], h=params["h"], w=params["w"],
                       kh=params["kh"], kw=params["kw"], stride=tuple(params["stride"]),
                       pads=tuple(params["pads"]), act=activations.normalize(params["act"]),
                       residual=bool(params["residual"]), threads=params.get("threads", 2),
                       layout=params.get("layout", "nchwc"))


def _row_offsets(s: DirectShape) -> np.ndarray:
    """Offset into the input buffer of every reduction row (c, r, s), ONNX's order."""
    if s.rows_layout:
        return np.arange(s.c)
    _, wp = s.input_hw
    hp = s.input_hw[0]
    c = np.arange(s.c).reshape(-1, 1, 1)
    r = np.arange(s.kh).reshape(1, -1, 1)
    q = np.arange(s.kw).reshape(1, 1, -1)
    offsets = (c // BLOCK) * hp * wp * BLOCK + r * wp * BLOCK + q * BLOCK + c % BLOCK
    return offsets.ravel()


def groups_for(s: DirectShape, weight: np.ndarray) -> list[Group]:
    """The kernel's output groups for `weight` [k, c, kh, kw]: per output block the rows
    that are not zero in all its 16 channels; neighbouring blocks with the same rows pair
    up."""
    matrix = weight.reshape(s.k, -1)
    offsets = _row_offsets(s)
    order = np.argsort(offsets, kind="stable")      # walk the input in memory order
    live = (matrix.reshape(s.k // BLOCK, BLOCK, -1) != 0).any(axis=1)[:, order]
    kept = [tuple(int(i) for i in order[row]) for row in live]
    groups, block = [], 0
    while block < len(kept):
        size = 1
        while size < MAX_BLOCKS and block + size < len(kept) and \
                kept[block + size] == kept[block]:
            size += 1
        size = 1 << (size.bit_length() - 1)    # 1, 2 or 4: fewer tile shapes to compile
        rows = kept[block]
        groups.append(Group(block, size, tuple(int(offsets[i]) for i in rows), rows))
        block += size
    return groups


def kept_fraction(s: DirectShape, groups: list[Group]) -> float:
    """The share of the dense reduction work the kernel does."""
    dense = (s.k // BLOCK) * s.c * s.kh * s.kw
    return sum(len(g.rows) * g.blocks for g in groups) / max(dense, 1)


def pack_parameters(s: DirectShape, weight: np.ndarray, groups: list[Group]) -> np.ndarray:
    """U: per group, per kept row, the weights of its blocks' 16 * blocks output channels."""
    matrix = np.asarray(weight, np.float32).reshape(s.k, -1)
    parts = []
    for g in groups:
        outputs = matrix[g.first * BLOCK:(g.first + g.blocks) * BLOCK]
        parts.append(outputs[:, list(g.rows)].T.ravel())
    packed = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return np.ascontiguousarray(packed, np.float32) if packed.size else np.zeros(1, np.float32)


def pixels_per_tile(s: DirectShape, blocks: int, portable: bool = False) -> int:
    """P: the pixels of one tile, as many as the accumulators allow, at most a row's."""
    pixels = PORTABLE_TILE_PIXELS if portable else TILE_PIXELS[blocks]
    return max(1, min(s.rows_cols[1], pixels))


def group_chunks(groups: list[Group]) -> list[tuple[int, int]]:
    """Consecutive groups [first, last) whose packed weights fit WEIGHT_CHUNK_BYTES, so that a
    work item's weights stay in L2 while it walks its rows."""
    chunks, first, size = [], 0, 0
    for index, g in enumerate(groups):
        bytes_ = len(g.offsets) * g.blocks * BLOCK * 4
        if index > first and size + bytes_ > WEIGHT_CHUNK_BYTES:
            chunks.append((first, index))
            first, size = index, 0
        size += bytes_
    chunks.append((first, len(groups)))
    return chunks


def _bands(s: DirectShape, chunks: int) -> int:
    """Row bands per chunk of groups so that there are enough work items for the threads."""
    rows = s.rows_cols[0]
    wanted = -(-ITEMS_PER_THREAD * s.threads // max(chunks, 1))
    return max(1, min(rows, wanted))


def _tables(groups: list[Group]) -> str:
    offsets = [o for g in groups for o in g.offsets] or [0]
    starts, weights, at, u_at = [], [], 0, 0
    for g in groups:
        starts.append(at)
        weights.append(u_at)
        at += len(g.offsets)
        u_at += len(g.offsets) * g.blocks * BLOCK
    return (f"static const int OFFSETS[] = {{{', '.join(map(str, offsets))}}};\n"
            f"static const int ROW_START[] = {{{', '.join(map(str, starts))}}};\n"
            f"static const int ROW_COUNT[] = {{{', '.join(str(len(g.offsets)) for g in groups)}}};\n"
            f"static const long U_START[] = {{{', '.join(map(str, weights))}}};\n"
            f"static const int FIRST[] = {{{', '.join(str(g.first) for g in groups)}}};\n"
            f"static const int BLOCKS[] = {{{', '.join(str(g.blocks) for g in groups)}}};\n")


def _tile(s: DirectShape, name: str, blocks: int, p: int, weight_blocks: int) -> str:
    """The register tile for `blocks` output blocks and `p` pixels, kept rows only, of a
    group of `weight_blocks` blocks (its packed weights: that many vectors per row)."""
    act = activations.avx512(s.act, "a")
    step, out_step, _ = s.steps
    residual = "a = _mm512_add_ps(a, _mm512_loadu_ps(r + o));" if s.residual else ""
    return f"""
static inline __attribute__((always_inline)) void {name}_{p}(
    const float* __restrict__ xb, const int* __restrict__ offs, int count,
    const float* __restrict__ u, const float* __restrict__ bias, const float* __restrict__ res,
    float* __restrict__ y, long block_stride, int first, int last) {{
  __m512 acc[{blocks}][{p}];
  if (first) {{
    for (int b = 0; b < {blocks}; ++b) {{
      const __m512 bv = bias ? _mm512_loadu_ps(bias + b * 16) : _mm512_setzero_ps();
      for (int j = 0; j < {p}; ++j) acc[b][j] = bv;
    }}
  }} else {{
    for (int b = 0; b < {blocks}; ++b)
      for (int j = 0; j < {p}; ++j)
        acc[b][j] = _mm512_loadu_ps(y + b * block_stride + j * {out_step});
  }}
  for (int i = 0; i < count; ++i) {{
    const float* __restrict__ xi = xb + offs[i];
    __m512 wv[{blocks}];
    for (int b = 0; b < {blocks}; ++b)
      wv[b] = _mm512_loadu_ps(u + ((long)i * {weight_blocks} + b) * 16);
    for (int j = 0; j < {p}; ++j) {{
      const __m512 xv = _mm512_set1_ps(xi[j * {step}]);
      for (int b = 0; b < {blocks}; ++b) acc[b][j] = _mm512_fmadd_ps(xv, wv[b], acc[b][j]);
    }}
  }}
  if (!last) {{   /* a partial sum: the next chunk of rows goes on from it */
    for (int b = 0; b < {blocks}; ++b)
      for (int j = 0; j < {p}; ++j)
        _mm512_storeu_ps(y + b * block_stride + j * {out_step}, acc[b][j]);
    return;
  }}
  for (int b = 0; b < {blocks}; ++b)
    for (int j = 0; j < {p}; ++j) {{
      const long o = b * block_stride + j * {out_step};
      const float* __restrict__ r = res;
      __m512 a = acc[b][j];
      {residual}
      {act}
      _mm512_storeu_ps(y + o, a);
    }}
  (void)res;
}}
"""


def lower(s: DirectShape, groups: list[Group], name: str, portable: bool = False) -> str:
    """C source of `void name(x, u, bias, residual, y)` for `s` and its kept rows; with
    `portable`, tiled for a build without AVX-512 (module doc)."""
    assert (s.rows_layout or s.c % BLOCK == 0) and s.k % BLOCK == 0, "whole channel blocks"
    rows, cols = s.rows_cols
    hp, wp = s.input_hw
    chunks = group_chunks(groups)
    bands = _bands(s, len(chunks))
    band_rows = -(-rows // bands)
    bands = -(-rows // band_rows)
    tiles, calls = _tiles_and_calls(s, groups, portable)
    return f"""{portable_simd.HEADER}#include <stddef.h>
#include <string.h>
{activations.C_HELPERS}
extern void wpk_pool_run(void (*fn)(int, int, void*), void* ctx, int total);
extern float* wpk_thread_scratch(size_t floats);
extern void wpk_kernel_failed(const char* why);
struct job {{ const float* x; const float* xp; const float* u; const float* b; const float* r;
             float* y; }};
#define ROWS {rows}
#define COLS {cols}
#define BAND_ROWS {band_rows}
#define BANDS {bands}
#define ROW_CHUNK {ROW_CHUNK_BYTES // (BLOCK * 4)}
{_tables(groups)}{tiles}{_pad_copy(s) if s.padded else ""}
static const int CHUNK_FIRST[] = {{{', '.join(str(c[0]) for c in chunks)}}};
static const int CHUNK_END[] = {{{', '.join(str(c[1]) for c in chunks)}}};
{_item_fn(s, calls)}
void {name}(const float* x, const float* u, const float* bias, const float* residual,
            float* y) {{
  struct job jb = {{x, x, u, bias, residual, y}};
{_pad_call(s, hp, wp)}
  wpk_pool_run(item_fn, &jb, {len(chunks)} * BANDS);
}}
"""


def _tiles_and_calls(s: DirectShape, groups: list[Group], portable: bool) -> tuple[str, str]:
    """The tile functions the groups need (a full tile and a row's tail per block count),
    and the code that walks one output row with them. `portable`: a group's blocks one at
    a time (`PORTABLE_TILE_PIXELS`)."""
    cols = s.rows_cols[1]
    pixel_step, out_step, _ = s.steps
    calls, tiles = [], []
    for blocks in sorted({g.blocks for g in groups}):
        tile_blocks = 1 if portable else blocks
        name = f"tile{tile_blocks}of{blocks}" if tile_blocks < blocks else f"tile{blocks}"
        p = pixels_per_tile(s, tile_blocks, portable)
        tail = cols % p

        def call(width: int) -> str:   # tile b (of blocks // tile_blocks) at pixel ox
            at = "(long)b" if tile_blocks == 1 else f"(long)b * {tile_blocks}"
            return (f"{name}_{width}(xrow + (long)ox * {pixel_step}, offs + r0, r1 - r0,\n"
                    f"            u + (long)r0 * {blocks * 16} + {at} * 16, "
                    f"bias ? bias + {at} * 16 : 0,\n"
                    f"            res ? res + ox * 16 + {at} * block_stride : 0,\n"
                    f"            yrow + (long)ox * {out_step} + {at} * block_stride, "
                    f"block_stride, r0 == 0, r1 == count);")
        tail_call = f"""
      if (ox < COLS)
        for (int b = 0; b < {blocks // tile_blocks}; ++b)
          {call(tail)}""" if tail else ""
        calls.append(f"""    if (BLOCKS[g] == {blocks}) {{
      int ox = 0;
      for (; ox + {p} <= COLS; ox += {p})
        for (int b = 0; b < {blocks // tile_blocks}; ++b)
          {call(p)}{tail_call}
    }}""")
        tiles.append(_tile(s, name, tile_blocks, p, blocks))
        if tail:
            tiles.append(_tile(s, name, tile_blocks, tail, blocks))
    return "".join(tiles), "\n".join(calls)


def _item_fn(s: DirectShape, calls: str) -> str:
    """One work item: a band of output rows of a chunk of groups, the kept rows walked in
    chunks that stay in L1 (partial sums in Y between them)."""
    wp = s.input_hw[1]
    row_step = (s.stride[0] * wp if not s.flat else 0) * BLOCK
    source_x = "jb->xp" if s.padded else "jb->x"
    return f"""
static void item_fn(int item, int slot, void* ctx) {{
  (void)slot;
  const struct job* jb = (const struct job*)ctx;
  const int chunk = item / BANDS, band = item % BANDS;
  const long block_stride = {s.steps[2]};
  const int last = band * BAND_ROWS + BAND_ROWS < ROWS ? band * BAND_ROWS + BAND_ROWS : ROWS;
  for (int g = CHUNK_FIRST[chunk]; g < CHUNK_END[chunk]; ++g) {{
    const int* offs = OFFSETS + ROW_START[g];
    const int count = ROW_COUNT[g];
    const float* u = jb->u + U_START[g];
    const float* bias = jb->b ? jb->b + FIRST[g] * 16 : 0;
    const int chunk_rows = ROW_CHUNK / BLOCKS[g];
    for (int r0 = 0; r0 < count || r0 == 0; r0 += chunk_rows) {{   /* once where none kept */
      const int r1 = r0 + chunk_rows < count ? r0 + chunk_rows : count;
      for (int oy = band * BAND_ROWS; oy < last; ++oy) {{
        const float* xrow = {source_x} + (long)oy * {row_step};
        float* yrow = jb->y + (long)FIRST[g] * block_stride + (long)oy * COLS * {s.steps[1]};
        const float* res =
            jb->r ? jb->r + (long)FIRST[g] * block_stride + (long)oy * COLS * 16 : 0;
{calls}
      }}
    }}
  }}
}}
"""


def _pad_copy(s: DirectShape) -> str:
    hp, wp = s.input_hw
    top, left = s.pads[0], s.pads[1]
    return f"""
/* one channel block of X into the zero-bordered buffer */
static void pad_fn(int item, int slot, void* ctx) {{
  (void)slot;
  const struct job* jb = (const struct job*)ctx;
  float* dst = (float*)jb->xp + (long)item * {hp} * {wp} * 16;
  const float* src = jb->x + (long)item * {s.h} * {s.w} * 16;
  memset(dst, 0, sizeof(float) * {top} * {wp} * 16);
  for (int r = 0; r < {s.h}; ++r) {{
    float* d = dst + ((long)(r + {top}) * {wp}) * 16;
    memset(d, 0, sizeof(float) * {left} * 16);
    memcpy(d + {left} * 16, src + (long)r * {s.w} * 16, sizeof(float) * {s.w} * 16);
    memset(d + ({left} + {s.w}) * 16, 0, sizeof(float) * ({wp} - {left} - {s.w}) * 16);
  }}
  memset(dst + (long)({top} + {s.h}) * {wp} * 16, 0,
         sizeof(float) * ({hp} - {top} - {s.h}) * {wp} * 16);
}}
"""


def _pad_call(s: DirectShape, hp: int, wp: int) -> str:
    if not s.padded:
        return ""
    floats = s.c * hp * wp
    return f"""  float* xp = wpk_thread_scratch({floats});
  if (!xp) {{ wpk_kernel_failed("out of memory for its padded input"); return; }}
  jb.xp = xp;
  wpk_pool_run(pad_fn, &jb, {s.c // BLOCK});"""


def reference(s: DirectShape, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
              residual: np.ndarray | None = None) -> np.ndarray:
    """NumPy reference (tests): NCHW conv (or the GEMM) + bias (+ residual), then the
    activation."""
    if s.rows_layout:
        y = x.reshape(s.w, s.c).astype(np.float64) @ weight.reshape(s.k, s.c).T.astype(np.float64)
        return activations.apply(s.act, y + (0 if bias is None else bias)).astype(np.float32)
    oh, ow = s.out_hw
    xp = np.pad(x, ((0, 0), (0, 0), (s.pads[0], s.pads[2]), (s.pads[1], s.pads[3])))
    y = np.zeros((1, s.k, oh, ow), np.float64)
    for r in range(s.kh):
        for q in range(s.kw):
            patch = xp[:, :, r:r + s.stride[0] * oh:s.stride[0], q:q + s.stride[1] * ow:s.stride[1]]
            y += np.einsum("nchw,kc->nkhw", patch, weight[:, :, r, q])
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1)
    if residual is not None:
        y += residual
    return activations.apply(s.act, y).astype(np.float32)
