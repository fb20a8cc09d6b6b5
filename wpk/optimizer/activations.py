"""Activations our generated AVX-512 kernels fuse after a convolution, in the forms real
exporters write and ONNX Runtime fuses into its NCHWc Conv (`activation` attribute):

- "relu": Relu;
- "clip:LO:HI": Clip with constant bounds (torch writes ReLU6 as Clip(0, 6), Hardtanh as
  Clip(-1, 1));
- "hardswish": x * clip(x / 6 + 1/2, 0, 1) (MobileNetV3; ONNX Runtime fuses HardSwish);
- "swish:ALPHA": x * sigmoid(ALPHA x), SiLU for ALPHA 1 (EfficientNet; torch writes
  x * Sigmoid(x), which ONNX Runtime turns into its QuickGelu node after the Conv);
- "": none.

A kernel parameter holds one of these strings; `True` / `False` (what older kernels stored
for Relu / none) read as "relu" / "".
"""
from __future__ import annotations

import numpy as np


def normalize(value: str | bool | None) -> str:
    """The activation string of a kernel parameter (accepts the older booleans)."""
    if value is True:
        return "relu"
    if value in (False, None, ""):
        return ""
    if value in ("relu", "hardswish"):
        return value
    if isinstance(value, str) and value.startswith("clip:"):
        clip_bounds(value)   # validates
        return value
    if isinstance(value, str) and value.startswith("swish:"):
        swish_alpha(value)
        return value
    raise ValueError(f"unknown activation {value!r}")


def swish(alpha: float) -> str:
    return f"swish:{float(alpha)!r}"


def swish_alpha(value: str) -> float:
    alpha = float(value.split(":", 1)[1])
    if not np.isfinite(alpha):
        raise ValueError(f"activation {value!r}: alpha must be finite")
    return alpha


def clip(lo: float, hi: float) -> str:
    return f"clip:{float(lo)!r}:{float(hi)!r}"


def clip_bounds(value: str) -> tuple[float, float]:
    _, lo, hi = value.split(":")
    bounds = float(lo), float(hi)
    if not bounds[0] <= bounds[1]:
        raise ValueError(f"activation {value!r}: lower bound above the upper")
    return bounds


def from_ort_attributes(attrs: dict) -> str | None:
    """The activation an ONNX Runtime NCHWc Conv applies (its `activation` and
    `activation_params` attributes), or None where it is one our kernels do not fuse."""
    kind = attrs.get("activation")
    if kind is None:
        return ""
    if kind == "Relu":
        return "relu"
    if kind == "HardSwish":
        return "hardswish"
    params = list(attrs.get("activation_params", []))
    if kind == "Clip" and len(params) == 2 and np.all(np.isfinite(params)) and \
            params[0] <= params[1]:
        return clip(*params)
    return None


def avx512(value: str | bool | None, var: str = "a") -> str:
    """C statement applying the activation to the __m512 variable `var` (empty for none)."""
    act = normalize(value)
    if act == "relu":
        return f"{var} = _mm512_max_ps({var}, _mm512_setzero_ps());"
    if act == "hardswish":
        return (f"{var} = _mm512_mul_ps({var}, _mm512_min_ps(_mm512_max_ps(_mm512_fmadd_ps("
                f"{var}, _mm512_set1_ps(1.0f / 6.0f), _mm512_set1_ps(0.5f)), "
                f"_mm512_setzero_ps()), _mm512_set1_ps(1.0f)));")
    if act.startswith("swish:"):
        alpha = swish_alpha(act)
        return (f"{var} = _mm512_div_ps({var}, _mm512_add_ps(_mm512_set1_ps(1.0f), "
                f"wpk_exp_ps(_mm512_mul_ps({var}, _mm512_set1_ps({-alpha!r}f)))));")
    if act:
        lo, hi = clip_bounds(act)
        return (f"{var} = _mm512_min_ps(_mm512_max_ps({var}, _mm512_set1_ps({lo!r}f)), "
                f"_mm512_set1_ps({hi!r}f));")
    return ""


def apply(value: str | bool | None, x: np.ndarray) -> np.ndarray:
    """NumPy reference of the activation (tests)."""
    act = normalize(value)
    if act == "relu":
        return np.maximum(x, 0)
    if act == "hardswish":
        return x * np.clip(x / 6 + 0.5, 0, 1)
    if act.startswith("swish:"):
        return x / (1 + np.exp(-swish_alpha(act) * x))
    if act:
        return np.clip(x, *clip_bounds(act))
    return x


# C helpers the activations' statements call; every kernel source includes them (unused static
# inline functions cost nothing). exp: Cephes' single-precision range reduction and
# polynomial (relative error ~2e-7 over the clamped range, which keeps 2^n finite), scaled by
# 2^n with AVX-512's scalef.
C_HELPERS = r"""
static inline __m512 wpk_exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
"""
