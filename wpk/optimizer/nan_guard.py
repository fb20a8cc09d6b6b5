"""`Where(IsNaN(x), c, x)` (a NaN guard: torch's export of scaled-dot-product attention writes
one after every softmax, and `attention.py` keeps it after the fused operator) as one pass,
generated as C and run as a custom operator (`ort_ops.py`).

Why: ONNX Runtime runs the guard as two operators, IsNaN writing a bool tensor and a
broadcasting Where reading it back with the input: about 70 µs per [128, 256] tensor on a
2-core Xeon, where one read and one write of it take a few.

Arguments of `void name(x, u, unused, unused, y)`: x and y of `size` floats, u[0] = c.
Plain C: the compiler vectorizes the select (`x != x` is true only for NaN, and stays so
without -ffast-math, which the kernels are never built with).
"""
from __future__ import annotations

from dataclasses import dataclass

# floats per work item: large enough that claiming one costs nothing next to streaming it
ITEM_FLOATS = 16384


@dataclass(frozen=True)
class NanGuardShape:
    size: int
    threads: int = 2

    @property
    def items(self) -> int:
        return -(-self.size // ITEM_FLOATS)


def nan_guard_shape(params: dict) -> NanGuardShape:
    return NanGuardShape(size=params["size"], threads=params.get("threads", 2))


def lower(shape: NanGuardShape, name: str) -> str:
    """C source of `void name(x, u, unused, unused, y)` for `shape`."""
    return f"""#include <stddef.h>
extern void wpk_pool_run(void (*fn)(int, int, void*), void* ctx, int total);
struct job {{ const float* x; float fill; float* y; }};
#define SIZE {shape.size}
#define ITEM {ITEM_FLOATS}

static void item_fn(int item, int slot, void* ctx) {{
  (void)slot;
  const struct job* jb = (const struct job*)ctx;
  const size_t first = (size_t)item * ITEM;
  const size_t last = first + ITEM < SIZE ? first + ITEM : SIZE;
  const float* __restrict__ x = jb->x;
  float* __restrict__ y = jb->y;
  const float fill = jb->fill;
  for (size_t i = first; i < last; ++i) y[i] = x[i] != x[i] ? fill : x[i];
}}

void {name}(const float* x, const float* u, const float* unused_bias,
            const float* unused_skip, float* y) {{
  (void)unused_bias;
  (void)unused_skip;
  struct job jb = {{x, u[0], y}};
  wpk_pool_run(item_fn, &jb, {shape.items});
}}
"""
