"""Multi-head attention's core (scores, bias, softmax, weighted values) for one sequence,
generated as C and run as a custom operator (`ort_ops.py`) in place of ONNX Runtime's
`Attention` or `MultiHeadAttention`.

Why: ONNX Runtime's CPU `Attention` multiplies each head's small matrices one GEMM call at a
time (a [S, H] x [H, L] product is too thin for MLAS to run near peak). On all-MiniLM-L6-v2
(12 heads of 32, sequence 128) one operator took 1.0 ms of which the packed QKV projection,
run as one GEMM, needs about 0.45. Here the projection stays one GEMM (ONNX Runtime's MatMul,
MLAS, emitted before the kernel) and the kernel does the rest, a head per work item:

- the head's keys are transposed once into [H][L] (the K bias added), so a query row's scores
  are 16 keys per FMA: a broadcast of q[d] (scaled, its bias added) times a row of keys;
- two query rows at a time share every key and value load;
- the attention bias row is added, then max, exp (`activations.C_HELPERS`, Cephes), sum;
- the values (V bias added at the end: the weights sum to 1) accumulate H/16 vectors per row.

A row whose every score is -inf (all keys masked) comes out NaN, as the softmax of ONNX
Runtime's operator gives it; the NaN guard torch writes after attention then makes it zeros.

Inputs of `void name(x, u, b, r, y)`, by `packed`:
- packed (ONNX Runtime's `Attention`): x = QKV [S, 3D] (Q | K | V, heads of H inside each),
  u = the QKV bias [3D], b unused;
- not packed (`MultiHeadAttention`): x = Q [S, D], u = K [L, D], b = V [L, D];
r = the attention bias [heads or 1][S][L] or NULL; y = [S, D]. Needs H and L multiples of 16.
"""
from __future__ import annotations

from dataclasses import dataclass

from wpk.optimizer import activations, portable_simd


@dataclass(frozen=True)
class AttentionShape:
    s: int               # query rows
    l: int               # keys
    heads: int
    head_size: int       # H
    scale: float
    packed: bool
    bias_heads: int = 0  # attention bias: 0 none, 1 shared by the heads, `heads` one each
    threads: int = 2

    @property
    def hidden(self) -> int:
        return self.heads * self.head_size

    @property
    def scratch_floats(self) -> int:
        """Per thread: the transposed keys, and two rows of scores."""
        return self.head_size * self.l + 2 * self.l


def attention_shape(params: dict) -> AttentionShape:
    return AttentionShape(s=params["s"], l=params["l"], heads=params["heads"],
                          head_size=params["head_size"], scale=params["scale"],
                          packed=params["packed"], bias_heads=params.get("bias_heads", 0),
                          threads=params.get("threads", 2))


def supported(head_size: int, keys: int) -> bool:
    return head_size % 16 == 0 and keys % 16 == 0 and 0 < head_size <= 256


def _addresses(a: AttentionShape) -> str:
    """Macros: each head's Q, K and V rows and their biases, by layout."""
    d = a.hidden
    if a.packed:
        return f"""#define Q_ROW(i) (jb->x + (long)(i) * {3 * d} + h * H)
#define K_AT(j, e) (jb->x[(long)(j) * {3 * d} + {d} + h * H + (e)] + jb->u[{d} + h * H + (e)])
#define V_ROW(j) (jb->x + (long)(j) * {3 * d} + {2 * d} + h * H)
#define Q_BIAS(e) jb->u[h * H + (e)]
#define V_BIAS (jb->u + {2 * d} + h * H)
"""
    return f"""#define Q_ROW(i) (jb->x + (long)(i) * {d} + h * H)
#define K_AT(j, e) jb->u[(long)(j) * {d} + h * H + (e)]
#define V_ROW(j) (jb->b + (long)(j) * {d} + h * H)
#define Q_BIAS(e) 0.0f
#define V_BIAS ((const float*)0)
"""


# the kernel's functions, after the macros `lower` defines (sizes, SCALE, SCRATCH_FLOATS,
# BIAS_ROW and the addresses of each head's Q, K and V)
BODY = r"""
/* scores of query rows i0 and i1 (scaled, bias added) into p0 and p1 */
static void scores(const struct job* jb, int h, const float* kt, int i0, int i1,
                   float* p0, float* p1) {
  const float* q0 = Q_ROW(i0);
  const float* q1 = Q_ROW(i1);
  const __m512 scale = _mm512_set1_ps(SCALE);
  for (int kb = 0; kb < KB; kb += 4) {
    const int n = KB - kb < 4 ? KB - kb : 4;
    __m512 a0[4], a1[4];
    for (int t = 0; t < 4; ++t) { a0[t] = _mm512_setzero_ps(); a1[t] = _mm512_setzero_ps(); }
    for (int e = 0; e < H; ++e) {
      const __m512 x0 = _mm512_set1_ps(q0[e] + Q_BIAS(e));
      const __m512 x1 = _mm512_set1_ps(q1[e] + Q_BIAS(e));
      const float* krow = kt + (long)e * L + kb * 16;
      for (int t = 0; t < n; ++t) {
        const __m512 kv = _mm512_loadu_ps(krow + t * 16);
        a0[t] = _mm512_fmadd_ps(x0, kv, a0[t]);
        a1[t] = _mm512_fmadd_ps(x1, kv, a1[t]);
      }
    }
    for (int t = 0; t < n; ++t) {
      __m512 s0 = _mm512_mul_ps(a0[t], scale), s1 = _mm512_mul_ps(a1[t], scale);
      if (jb->r) {
        const float* bias = jb->r + (long)BIAS_ROW * S * L + (kb + t) * 16;
        s0 = _mm512_add_ps(s0, _mm512_loadu_ps(bias + (long)i0 * L));
        s1 = _mm512_add_ps(s1, _mm512_loadu_ps(bias + (long)i1 * L));
      }
      _mm512_storeu_ps(p0 + (kb + t) * 16, s0);
      _mm512_storeu_ps(p1 + (kb + t) * 16, s1);
    }
  }
}

/* softmax of one row of scores in place, less its 1 / sum: returned (NaN: every key masked) */
static float exponentials(float* p) {
  __m512 m = _mm512_loadu_ps(p);
  for (int kb = 1; kb < KB; ++kb) m = _mm512_max_ps(m, _mm512_loadu_ps(p + kb * 16));
  const float top = wpk_max16(m);
  if (top == -INFINITY) return NAN;
  const __m512 shift = _mm512_set1_ps(top);
  __m512 total = _mm512_setzero_ps();
  for (int kb = 0; kb < KB; ++kb) {
    const __m512 e = wpk_exp_ps(_mm512_sub_ps(_mm512_loadu_ps(p + kb * 16), shift));
    _mm512_storeu_ps(p + kb * 16, e);
    total = _mm512_add_ps(total, e);
  }
  return 1.0f / wpk_sum16(total);
}

/* y rows i0 and i1 of head h: the values weighted by p0 and p1, times w0 and w1 */
static void weighted(const struct job* jb, int h, const float* p0, const float* p1,
                     float w0, float w1, int i0, int i1) {
  __m512 a0[HB], a1[HB];
  for (int t = 0; t < HB; ++t) { a0[t] = _mm512_setzero_ps(); a1[t] = _mm512_setzero_ps(); }
  for (int j = 0; j < L; ++j) {
    const float* v = V_ROW(j);
    const __m512 x0 = _mm512_set1_ps(p0[j]), x1 = _mm512_set1_ps(p1[j]);
    for (int t = 0; t < HB; ++t) {
      const __m512 vv = _mm512_loadu_ps(v + t * 16);
      a0[t] = _mm512_fmadd_ps(x0, vv, a0[t]);
      a1[t] = _mm512_fmadd_ps(x1, vv, a1[t]);
    }
  }
  const float* vb = V_BIAS;
  for (int t = 0; t < HB; ++t) {
    __m512 y0 = _mm512_mul_ps(a0[t], _mm512_set1_ps(w0));
    __m512 y1 = _mm512_mul_ps(a1[t], _mm512_set1_ps(w1));
    if (vb) {
      y0 = _mm512_add_ps(y0, _mm512_loadu_ps(vb + t * 16));
      y1 = _mm512_add_ps(y1, _mm512_loadu_ps(vb + t * 16));
    }
    _mm512_storeu_ps(jb->y + (long)i0 * D + h * H + t * 16, y0);
    if (i1 != i0) _mm512_storeu_ps(jb->y + (long)i1 * D + h * H + t * 16, y1);
  }
}

static void head_fn(int h, int slot, void* ctx) {
  (void)slot;
  const struct job* jb = (const struct job*)ctx;
  float* kt = wpk_thread_scratch(SCRATCH_FLOATS);
  if (!kt) {   /* a pool thread's failure is not its caller's: flag it for the entry point */
    __atomic_store_n(&((struct job*)ctx)->failed, 1, __ATOMIC_RELAXED);
    return;
  }
  float* p0 = kt + (long)H * L;
  float* p1 = p0 + L;
  for (int j = 0; j < L; ++j)
    for (int e = 0; e < H; ++e) kt[(long)e * L + j] = K_AT(j, e);
  for (int i = 0; i < S; i += 2) {
    const int i1 = i + 1 < S ? i + 1 : i;
    scores(jb, h, kt, i, i1, p0, p1);
    const float w0 = exponentials(p0), w1 = exponentials(p1);
    weighted(jb, h, p0, p1, w0, w1, i, i1);
  }
}

"""


def lower(shape: AttentionShape, name: str) -> str:
    """C source of `void name(x, u, b, r, y)` for `shape`."""
    a = shape
    assert supported(a.head_size, a.l), "head size and keys in whole 16-float vectors"
    return f"""{portable_simd.HEADER}#include <math.h>
#include <stddef.h>
{activations.C_HELPERS}
extern void wpk_pool_run(void (*fn)(int, int, void*), void* ctx, int total);
extern float* wpk_thread_scratch(size_t floats);
extern void wpk_kernel_failed(const char* why);
struct job {{ const float* x; const float* u; const float* b; const float* r; float* y;
             int failed; }};
#define S {a.s}
#define L {a.l}
#define H {a.head_size}
#define D {a.hidden}
#define KB (L / 16)
#define HB (H / 16)
#define SCALE {a.scale!r}f
#define SCRATCH_FLOATS {a.scratch_floats}
#define BIAS_ROW {"0" if a.bias_heads <= 1 else "h"}
{portable_simd.REDUCTIONS}{_addresses(a)}{BODY}
void {name}(const float* x, const float* u, const float* b, const float* r, float* y) {{
  struct job jb = {{x, u, b, r, y, 0}};
  wpk_pool_run(head_fn, &jb, {a.heads});
  if (jb.failed) wpk_kernel_failed("out of memory for its transposed keys");
}}
"""
