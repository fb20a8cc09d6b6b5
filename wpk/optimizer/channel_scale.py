"""Channel scaling (a squeeze-excitation block's broadcast Mul) in ONNX Runtime's NCHWc layout,
generated as C with AVX-512 intrinsics and run as a custom operator (`ort_ops.py`).

Why: ONNX Runtime's NCHWc transformer keeps Convs, pools and same-shape element-wise ops in
the blocked layout, but not a Mul that broadcasts a [1, C, 1, 1] scale over [1, C, H, W]. In
EfficientNet and MobileNetV3 every block has one, so each block converts its largest tensor
out of the blocked layout (ReorderOutput), multiplies it, and converts it back (ReorderInput):
three passes over memory. In the blocked layout the scale is one vector per channel block,
and the three passes become one, read and written once.

Layouts: X and Y [C/16][H][W][16], S [C] (a [1, C, 1, 1] tensor: with C a multiple of 16, its
NCHW and NCHWc layouts are the same memory).
"""
from __future__ import annotations

from dataclasses import dataclass

BLOCK = 16
# pixels (16 floats each) per work item: small enough to balance the cores, large enough
# that claiming an item costs nothing next to streaming it
ITEM_PIXELS = 1024


@dataclass(frozen=True)
class ChannelScaleShape:
    c: int              # channels, a multiple of 16
    h: int
    w: int
    threads: int = 2

    @property
    def chunks(self) -> int:
        """Work items per channel block."""
        return max(1, -(-self.h * self.w // ITEM_PIXELS))


def channel_scale_shape(params: dict) -> ChannelScaleShape:
    return ChannelScaleShape(c=params["c"], h=params["h"], w=params["w"],
                             threads=params.get("threads", 2))


def lower(shape: ChannelScaleShape, name: str) -> str:
    """C source of `void name(x, scale, unused, unused, y)` for `shape`."""
    s = shape
    assert s.c % BLOCK == 0, "whole channel blocks"
    pixels = s.h * s.w
    per_item = -(-pixels // s.chunks)
    return f"""#include <immintrin.h>
#include <stddef.h>
extern void wpk_pool_run(void (*fn)(int, int, void*), void* ctx, int total);
struct job {{ const float* x; const float* scale; float* y; }};
#define PIXELS {pixels}
#define CHUNKS {s.chunks}
#define PER_ITEM {per_item}

static void item_fn(int item, int slot, void* ctx) {{
  (void)slot;
  const struct job* jb = (const struct job*)ctx;
  const int cb = item / CHUNKS, part = item % CHUNKS;
  const __m512 scale = _mm512_loadu_ps(jb->scale + cb * 16);
  const size_t first = (size_t)part * PER_ITEM;
  const size_t last = first + PER_ITEM < PIXELS ? first + PER_ITEM : PIXELS;
  const float* __restrict__ x = jb->x + (size_t)cb * PIXELS * 16;
  float* __restrict__ y = jb->y + (size_t)cb * PIXELS * 16;
  for (size_t p = first; p < last; ++p)
    _mm512_storeu_ps(y + p * 16, _mm512_mul_ps(_mm512_loadu_ps(x + p * 16), scale));
}}

void {name}(const float* x, const float* scale, const float* unused_bias,
            const float* unused_residual, float* y) {{
  (void)unused_bias;
  (void)unused_residual;
  struct job jb = {{x, scale, y}};
  wpk_pool_run(item_fn, &jb, {s.c // BLOCK} * CHUNKS);
}}
"""
