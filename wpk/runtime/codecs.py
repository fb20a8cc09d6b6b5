"""Wire codecs for the tensors that cross a link between tiers.

A link's `codec` in plan.json is `raw`, `fp16`, `int8`, or any of them followed by `+zstd`
(`zstd` alone means `raw+zstd`). The sender encodes each forwarded tensor; the tensor keeps
its logical datatype and shape in the request, and its per-tensor parameters say how the raw
bytes were encoded:

    wpk_codec  (string)  the codec applied to this tensor, e.g. "fp16+zstd"
    wpk_scale  (double)  int8 only: value = int8 * scale

Without `wpk_codec` the bytes are plain raw contents, so standard clients are unaffected.

Accuracy (float32 tensors; other dtypes and non-finite values are always sent exactly):
- fp16: relative error <= 2**-11 (~4.9e-4) per element for |x| in fp16's normal range
  (6.1e-5 .. 65504); smaller values lose relative precision (absolute error <= 2**-25).
  Tensors with |x| > 65504 fall back to raw.
- int8: symmetric per-tensor scale = max|x| / 127; absolute error <= scale / 2 per element.
- zstd: lossless.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np

from wpk.errors import WpkError
from wpk.link_codecs import parse_codec

FP16_MAX = 65504.0
CODEC_PARAM = "wpk_codec"
SCALE_PARAM = "wpk_scale"


@dataclass(frozen=True)
class Codec:
    base: str = "raw"
    zstd: bool = False

    @classmethod
    def parse(cls, spec: str | None) -> "Codec":
        """"fp16+zstd" -> Codec("fp16", True); raises WpkError on anything else."""
        return cls(*parse_codec(spec))

    @property
    def name(self) -> str:
        return self.base + ("+zstd" if self.zstd else "")

    @property
    def lossy(self) -> bool:
        return self.base != "raw"

    def tolerance(self, array: np.ndarray) -> np.ndarray:
        """Largest absolute decoding error per element that this codec promises."""
        x = np.abs(array.astype(np.float64))
        if self.base == "fp16":
            return np.maximum(x * 2.0 ** -11, 2.0 ** -25)
        if self.base == "int8":
            return np.full_like(x, max(float(x.max(initial=0.0)), 1e-30) / 127 / 2 * 1.0001)
        return np.zeros_like(x)


def _applies(codec: Codec, array: np.ndarray) -> str:
    """The base codec actually used for this tensor (lossy codecs only touch finite floats)."""
    if codec.base == "raw" or array.dtype not in (np.float32, np.float64) or array.size == 0:
        return "raw"
    peak = float(np.max(np.abs(array)))
    if not np.isfinite(peak):
        return "raw"
    if codec.base == "fp16" and peak > FP16_MAX:
        return "raw"
    return codec.base


class Encoder:
    """Encodes arrays for one link. Holds a zstd compressor: use from one thread."""

    def __init__(self, codec: Codec, zstd_level: int = 1):
        self.codec = codec
        self._compressor = None
        if codec.zstd:
            import zstandard

            self._compressor = zstandard.ZstdCompressor(level=zstd_level)

    def encode(self, array: np.ndarray) -> tuple[bytes, dict[str, str | float]]:
        """(bytes, tensor parameters) for one tensor."""
        base = _applies(self.codec, array)
        params: dict[str, str | float] = {}
        if base == "fp16":
            data = np.ascontiguousarray(array, dtype=np.float16).tobytes()
        elif base == "int8":
            scale = float(np.max(np.abs(array))) / 127.0 or 1.0
            q = np.clip(np.rint(array / scale), -127, 127).astype(np.int8)
            data = q.tobytes()
            params[SCALE_PARAM] = scale
        else:
            data = np.ascontiguousarray(array).tobytes()
        if self._compressor is not None:
            data = self._compressor.compress(data)
        name = base + ("+zstd" if self.codec.zstd else "")
        if name != "raw":
            params[CODEC_PARAM] = name
        return data, params


class DecodeError(ValueError):
    pass


def decode(data: bytes, dtype: np.dtype, shape: tuple[int, ...], codec_name: str,
           scale: float | None) -> np.ndarray:
    """Bytes encoded with `codec_name` -> array of `dtype` and `shape` (checks sizes)."""
    try:
        codec = Codec.parse(codec_name)
    except WpkError as error:
        raise DecodeError(str(error)) from None
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise DecodeError(f"{SCALE_PARAM} must be a finite number, not {scale!r}")
    count = math.prod(shape)
    width = {"raw": dtype.itemsize, "fp16": 2, "int8": 1}[codec.base]
    expected = count * width
    if codec.zstd:
        import zstandard

        try:
            size = zstandard.frame_content_size(data) if len(data) >= 4 else -1
        except zstandard.ZstdError:   # no zstd frame header at all
            raise DecodeError(f"{codec.name} contents are not a zstd frame") from None
        if size != expected:
            raise DecodeError(f"{codec.name} frame holds {size} bytes, expected {expected}")
        try:
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)
        except zstandard.ZstdError as error:
            raise DecodeError(f"zstd: {error}") from None
    if len(data) != expected:
        raise DecodeError(f"{codec.name} contents hold {len(data)} bytes, expected {expected}")
    if codec.base == "raw":
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype not in (np.float32, np.float64):
        raise DecodeError(f"{codec.base} applies to FP32/FP64 tensors only")
    if codec.base == "fp16":
        return np.frombuffer(data, dtype=np.float16).astype(dtype).reshape(shape)
    if scale is None:
        raise DecodeError(f"int8 tensor without {SCALE_PARAM}")
    return (np.frombuffer(data, dtype=np.int8).astype(dtype) * dtype.type(scale)).reshape(shape)
