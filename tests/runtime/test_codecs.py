"""Wire codecs: each round-trips within the tolerance docs/runtime.md states."""
import numpy as np
import pytest

from wpk.errors import WpkError
from wpk.runtime.codecs import CODEC_PARAM, SCALE_PARAM, Codec, DecodeError, Encoder, decode

CODECS = ["raw", "fp16", "int8", "zstd", "raw+zstd", "fp16+zstd", "int8+zstd"]


def roundtrip(spec: str, array: np.ndarray) -> tuple[np.ndarray, bytes, dict]:
    data, params = Encoder(Codec.parse(spec)).encode(array)
    out = decode(data, array.dtype, array.shape, params.get(CODEC_PARAM, "raw"),
                 params.get(SCALE_PARAM))
    return out, data, params


@pytest.mark.parametrize("spec", CODECS)
def test_codec_round_trips_within_stated_tolerance(spec):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((2, 16, 9, 9)) * 3).astype(np.float32)
    array[0, 0, 0, 0] = 0.0
    out, _, _ = roundtrip(spec, array)
    assert out.dtype == array.dtype and out.shape == array.shape
    tolerance = Codec.parse(spec).tolerance(array)
    assert np.all(np.abs(out.astype(np.float64) - array) <= tolerance)
    if not Codec.parse(spec).lossy:
        assert np.array_equal(out, array)


def test_lossy_codecs_shrink_the_payload():
    array = np.random.default_rng(1).standard_normal(4096).astype(np.float32)
    sizes = {spec: len(roundtrip(spec, array)[1]) for spec in ("raw", "fp16", "int8")}
    assert sizes == {"raw": 16384, "fp16": 8192, "int8": 4096}
    sparse = np.maximum(array, 0) * (np.arange(4096) % 4 == 0)  # mostly zeros
    assert len(roundtrip("zstd", sparse)[1]) < 16384 / 2


def test_lossy_codecs_leave_integers_and_non_finite_exact():
    ints = np.arange(12, dtype=np.int64).reshape(3, 4)
    for spec in ("fp16", "int8+zstd"):
        out, _, params = roundtrip(spec, ints)
        assert np.array_equal(out, ints) and params.get(CODEC_PARAM, "raw") in ("raw", "raw+zstd")
    with_nan = np.array([1.0, np.nan, 2.0], dtype=np.float32)
    out, _, params = roundtrip("int8", with_nan)
    assert CODEC_PARAM not in params and np.array_equal(out, with_nan, equal_nan=True)


def test_fp16_falls_back_to_raw_beyond_its_range():
    big = np.array([1e6, -3.0], dtype=np.float32)
    out, _, params = roundtrip("fp16", big)
    assert CODEC_PARAM not in params and np.array_equal(out, big)


@pytest.mark.parametrize("spec", ["gzip", "fp16+int8", "zstd+zstd"])
def test_unknown_codec_is_a_one_line_error(spec):
    with pytest.raises(WpkError, match="unknown codec"):
        Codec.parse(spec)


def test_decode_rejects_truncated_and_mislabelled_data():
    array = np.ones((4, 4), dtype=np.float32)
    data, _ = Encoder(Codec.parse("zstd")).encode(array)
    with pytest.raises(DecodeError, match="holds 64 bytes, expected 128"):
        decode(data, array.dtype, (8, 4), "raw+zstd", None)
    with pytest.raises(DecodeError, match="zstd"):
        decode(data[:-3], array.dtype, (4, 4), "raw+zstd", None)
    with pytest.raises(DecodeError, match="without wpk_scale"):
        decode(b"\x01" * 16, array.dtype, (4, 4), "int8", None)
