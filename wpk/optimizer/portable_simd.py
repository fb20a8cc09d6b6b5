"""The `_mm512_*` subset the direct GEMM kernel (`direct_conv.py`, layout "rows") and its
fused activations (`activations.py`) use, as a C header that also compiles where AVX-512 is
missing.

With `__AVX512F__` defined (the x86-64-v4 build) the header is `#include <immintrin.h>`:
the intrinsics, and the speed, are those of today. Without it, `__m512` is a struct of the
target's own GCC/Clang vector-extension vectors, two of 8 floats (AVX2 registers, x86-64-v3)
or four of 4 (SSE on baseline x86-64, NEON q-registers on aarch64), and each intrinsic a
static inline function over them. Not one 64-byte vector-extension type: GCC keeps that in
memory where the target has no 64-byte registers, and the kernels' accumulators with it.

Why so little: the other generated kernels (Winograd, depthwise, channel scale, the NCHWc
direct convolution) read or write ONNX Runtime's NCHWc tensors in blocks of 16 channels, and
ONNX Runtime uses 16-channel blocks only on AVX-512 machines (8 on AVX2, none on ARM), so
they stay AVX-512 only (`ort_ops.PORTABLE_OPS`).
"""
from __future__ import annotations

# every `_mm512_` function the shim defines (a test checks the kernels call no other)
SHIMMED = ("loadu_ps", "storeu_ps", "set1_ps", "setzero_ps", "add_ps", "sub_ps", "mul_ps",
           "div_ps",
           "max_ps", "min_ps", "fmadd_ps", "fnmadd_ps", "roundscale_ps", "scalef_ps")

# horizontal sum and max of a vector, for kernels that reduce rows (layer norm, softmax);
# through memory, so that they need nothing beyond the shim's loads and stores
REDUCTIONS = r"""
static inline float wpk_sum16(__m512 v) {
  float lanes[16];
  _mm512_storeu_ps(lanes, v);
  float total = 0.0f;
  for (int i = 0; i < 16; ++i) total += lanes[i];
  return total;
}

static inline float wpk_max16(__m512 v) {
  float lanes[16];
  _mm512_storeu_ps(lanes, v);
  float m = lanes[0];
  for (int i = 1; i < 16; ++i) m = lanes[i] > m ? lanes[i] : m;
  return m;
}
"""

HEADER = r"""#if defined(__AVX512F__)
#include <immintrin.h>
#else
/* wpk's portable shim: a 16-float __m512 as a struct of the target's own vectors, 2 of 8
   floats (AVX) or 4 of 4 (SSE, NEON), so that GCC keeps each in registers (a 64-byte
   vector-extension type lives in memory where the target has no 64-byte registers).
   Loads and stores are unaligned (may_alias pieces, as immintrin.h's __m512_u). */
#if defined(__AVX__)
#define WPK_LANES 8
#define WPK_SPLAT(x) {x, x, x, x, x, x, x, x}
#else
#define WPK_LANES 4
#define WPK_SPLAT(x) {x, x, x, x}
#endif
#define WPK_PIECES (16 / WPK_LANES)
typedef float wpk_vf __attribute__((vector_size(WPK_LANES * 4)));
typedef int wpk_vi __attribute__((vector_size(WPK_LANES * 4)));
typedef float wpk_vf_u __attribute__((vector_size(WPK_LANES * 4), aligned(4), may_alias));
typedef struct { wpk_vf p[WPK_PIECES]; } __m512;
#define WPK_SIMD static inline __attribute__((always_inline))
/* the body of a function whose result is `expr` on each piece i */
#define WPK_EACH(expr) __m512 r; for (int i = 0; i < WPK_PIECES; ++i) r.p[i] = (expr); return r;
#ifndef _MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_TO_NEAREST_INT 0
#define _MM_FROUND_NO_EXC 8
#endif
WPK_SIMD __m512 _mm512_loadu_ps(const void* p) { WPK_EACH(((const wpk_vf_u*)p)[i]) }
WPK_SIMD void _mm512_storeu_ps(void* p, __m512 v) {
  for (int i = 0; i < WPK_PIECES; ++i) ((wpk_vf_u*)p)[i] = v.p[i];
}
WPK_SIMD __m512 _mm512_set1_ps(float x) { const wpk_vf v = WPK_SPLAT(x); WPK_EACH(v) }
WPK_SIMD __m512 _mm512_setzero_ps(void) { const wpk_vf v = {0}; WPK_EACH(v) }
WPK_SIMD __m512 _mm512_add_ps(__m512 a, __m512 b) { WPK_EACH(a.p[i] + b.p[i]) }
WPK_SIMD __m512 _mm512_sub_ps(__m512 a, __m512 b) { WPK_EACH(a.p[i] - b.p[i]) }
WPK_SIMD __m512 _mm512_mul_ps(__m512 a, __m512 b) { WPK_EACH(a.p[i] * b.p[i]) }
WPK_SIMD __m512 _mm512_div_ps(__m512 a, __m512 b) { WPK_EACH(a.p[i] / b.p[i]) }
/* a * b + c: contracted to FMA instructions where the target has them (GCC's default
   -ffp-contract=fast outside ISO C mode) */
WPK_SIMD __m512 _mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) {
  WPK_EACH(a.p[i] * b.p[i] + c.p[i])
}
WPK_SIMD __m512 _mm512_fnmadd_ps(__m512 a, __m512 b, __m512 c) {
  WPK_EACH(c.p[i] - a.p[i] * b.p[i])
}
/* max and min as compare-and-select (C has no vector ?:); as AVX-512's: the second operand
   where either is NaN */
WPK_SIMD wpk_vf wpk_select(wpk_vi take, wpk_vf a, wpk_vf b) {
  return (wpk_vf)(((wpk_vi)a & take) | ((wpk_vi)b & ~take));
}
WPK_SIMD __m512 _mm512_max_ps(__m512 a, __m512 b) {
  WPK_EACH(wpk_select(a.p[i] > b.p[i], a.p[i], b.p[i]))
}
WPK_SIMD __m512 _mm512_min_ps(__m512 a, __m512 b) {
  WPK_EACH(wpk_select(a.p[i] < b.p[i], a.p[i], b.p[i]))
}
/* round to the nearest integer (the only rounding the kernels ask for), exact for
   |x| < 2^22: adding and taking away 1.5 * 2^23 drops the fraction */
WPK_SIMD __m512 wpk_round(__m512 x) {
  const wpk_vf magic = WPK_SPLAT(12582912.0f);
  WPK_EACH((x.p[i] + magic) - magic)
}
#define _mm512_roundscale_ps(x, mode) wpk_round(x)
/* x * 2^n for whole n in [-126, 127] (the exponential's range), built in the exponent bits */
WPK_SIMD __m512 _mm512_scalef_ps(__m512 x, __m512 n) {
  WPK_EACH(x.p[i] * (wpk_vf)((__builtin_convertvector(n.p[i], wpk_vi) + 127) << 23))
}
#endif
"""
