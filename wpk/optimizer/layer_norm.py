"""Layer normalization over the last axis (ONNX `LayerNormalization`, ONNX Runtime's fused
`SkipLayerNormalization`: y = LN(x + skip + bias) * gamma + beta), generated as C and run as
a custom operator (`ort_ops.py`).

Why: in a transformer encoder ONNX Runtime's CPU SkipLayerNormalization takes about as long
as a GEMM a quarter of the encoder's width (measured: 96 µs for one [128, 256] tensor, where
reading and writing it once costs a few µs). Here each row (H floats, a multiple of 16) is
summed once into a stack buffer while its sum accumulates in vector registers, then centred
and scaled from that buffer: the inputs are read once, the output written once.

Accuracy on rows with a large mean (1000 + N(0, 1), say): the buffer holds each value less
the row's first one (a shift, exact for values within a factor of two of it), so the mean
is summed over small numbers, and the variance is taken from the centred values (a second
pass over the row in L1), never as E[x²] - E[x]², which would be negative or noise there.

Arguments of `void name(x, u, bias, skip, y)`: x, skip and y [rows][H]; u = gamma then beta
(2H floats); bias [H] or NULL; skip NULL for plain LayerNormalization. The source includes
`portable_simd.HEADER`, so the kernel also compiles without AVX-512.
"""
from __future__ import annotations

from dataclasses import dataclass

from wpk.optimizer import portable_simd

LANES = 16
# rows per work item: a few items per thread, each item a few KB of rows
MIN_ITEMS_PER_THREAD = 4
# the row buffer lives on the stack: rows wider than this are left to ONNX Runtime
MAX_WIDTH = 16384


@dataclass(frozen=True)
class LayerNormShape:
    rows: int
    width: int          # H, the normalized (last) axis, a multiple of 16
    epsilon: float
    skip: bool          # SkipLayerNormalization: x + skip (+ bias) is normalized
    bias: bool
    threads: int = 2

    @property
    def rows_per_item(self) -> int:
        return max(1, -(-self.rows // (self.threads * MIN_ITEMS_PER_THREAD)))

    @property
    def items(self) -> int:
        return -(-self.rows // self.rows_per_item)


def layer_norm_shape(params: dict) -> LayerNormShape:
    return LayerNormShape(rows=params["rows"], width=params["width"],
                          epsilon=params["epsilon"], skip=params["skip"], bias=params["bias"],
                          threads=params.get("threads", 2))


def supported(width: int) -> bool:
    """Whether a row of `width` floats fits the kernel."""
    return 0 < width <= MAX_WIDTH and width % LANES == 0


def lower(shape: LayerNormShape, name: str) -> str:
    """C source of `void name(x, u, bias, skip, y)` for `shape`."""
    s = shape
    assert supported(s.width), "rows of whole 16-float vectors"
    load, first = "_mm512_loadu_ps(x + j)", "x[0]"
    if s.skip:
        load, first = f"_mm512_add_ps({load}, _mm512_loadu_ps(r + j))", f"({first} + r[0])"
    if s.bias:
        load = f"_mm512_add_ps({load}, _mm512_loadu_ps(jb->bias + j))"
        first = f"({first} + jb->bias[0])"
    return f"""{portable_simd.HEADER}#include <math.h>
#include <stddef.h>
extern void wpk_pool_run(void (*fn)(int, int, void*), void* ctx, int total);
struct job {{ const float* x; const float* u; const float* bias; const float* skip; float* y; }};
#define W {s.width}
#define ROWS {s.rows}
#define ROWS_PER_ITEM {s.rows_per_item}

{portable_simd.REDUCTIONS}
static void row(const struct job* jb, size_t i) {{
  const float* __restrict__ x = jb->x + i * W;
  const float* __restrict__ r = jb->skip ? jb->skip + i * W : NULL;
  float* __restrict__ y = jb->y + i * W;
  float buffer[W];
  const float first = {first};
  const __m512 shift = _mm512_set1_ps(first);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int j = 0; j < W; j += 16) {{
    const __m512 v = _mm512_sub_ps({load}, shift);
    _mm512_storeu_ps(buffer + j, v);
    if ((j / 16) & 1) acc1 = _mm512_add_ps(acc1, v); else acc0 = _mm512_add_ps(acc0, v);
  }}
  (void)r;
  const float mean = wpk_sum16(_mm512_add_ps(acc0, acc1)) / W;
  const __m512 m = _mm512_set1_ps(mean);
  acc0 = _mm512_setzero_ps();
  acc1 = _mm512_setzero_ps();
  for (int j = 0; j < W; j += 16) {{
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(buffer + j), m);
    if ((j / 16) & 1) acc1 = _mm512_fmadd_ps(d, d, acc1); else acc0 = _mm512_fmadd_ps(d, d, acc0);
  }}
  const float variance = wpk_sum16(_mm512_add_ps(acc0, acc1)) / W;
  const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(variance + {s.epsilon!r}f));
  for (int j = 0; j < W; j += 16) {{
    const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buffer + j), m), scale);
    _mm512_storeu_ps(y + j, _mm512_fmadd_ps(d, _mm512_loadu_ps(jb->u + j),
                                            _mm512_loadu_ps(jb->u + W + j)));
  }}
}}

static void item_fn(int item, int slot, void* ctx) {{
  (void)slot;
  const size_t first = (size_t)item * ROWS_PER_ITEM;
  const size_t last = first + ROWS_PER_ITEM < ROWS ? first + ROWS_PER_ITEM : ROWS;
  for (size_t i = first; i < last; ++i) row((const struct job*)ctx, i);
}}

void {name}(const float* x, const float* u, const float* bias, const float* skip, float* y) {{
  struct job jb = {{x, u, bias, skip, y}};
  wpk_pool_run(item_fn, &jb, {s.items});
}}
"""
