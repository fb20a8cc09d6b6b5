"""Activations our generated AVX-512 kernels fuse after a convolution, in the forms real
exporters write and ONNX Runtime fuses into its NCHWc Conv (`activation` attribute):

- "relu": Relu;
- "clip:LO:HI": Clip with constant bounds (torch writes ReLU6 as Clip(0, 6), Hardtanh as
  Clip(-1, 1));
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
    if value == "relu" or (isinstance(value, str) and value.startswith("clip:")):
        clip_bounds(value) if value != "relu" else None   # validates
        return value
    raise ValueError(f"unknown activation {value!r}")


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
    if act:
        return np.clip(x, *clip_bounds(act))
    return x
