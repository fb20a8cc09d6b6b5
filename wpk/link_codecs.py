"""The wire codecs a link of a plan may declare: names, parsing, and their price in bytes.

A codec is a base encoding (raw, fp16, int8), optionally followed by "+zstd". The runtime's
encoders live in wpk.runtime.codecs; this is what plans, tiers files and the partitioner need.
"""
from __future__ import annotations

from wpk.errors import WpkError

CODEC_BASES = ("raw", "fp16", "int8")
# Bytes on the wire per byte of a float32 tensor, before zstd (whose gain depends on data).
CODEC_BYTE_FACTOR = {"raw": 1.0, "fp16": 0.5, "int8": 0.25}


def parse_codec(spec: str | None) -> tuple[str, bool]:
    """"fp16+zstd" -> ("fp16", True); "zstd" -> ("raw", True); WpkError on anything else."""
    parts = [p.strip() for p in (spec or "raw").lower().split("+") if p.strip()]
    bases = [p for p in parts if p != "zstd"]
    if len(bases) > 1 or any(b not in CODEC_BASES for b in bases) or parts.count("zstd") > 1:
        raise WpkError(f"unknown codec {spec!r} (use raw, fp16 or int8, optionally "
                       "followed by +zstd)")
    return (bases[0] if bases else "raw"), "zstd" in parts
