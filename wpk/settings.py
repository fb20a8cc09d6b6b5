"""Every environment variable wpk reads, in one place, each read when it is used (never at
import time, so that a test or a caller can set it late).

    XDG_CACHE_HOME      where the partitioner caches this machine's roofline calibration
                        (default ~/.cache; wpk uses its wpk/ folder)
    WPK_TUNING_LOG      wpk-optimize's tuning log (default ~/.cache/wpk/tuning.jsonl, not
                        under XDG_CACHE_HOME: where existing logs are)
    WPK_KERNEL_CACHE    where generated kernels are compiled (default $TMPDIR/wpk-kernels)
    CC                  the C compiler for generated kernels (default gcc)
    WPK_KERNEL_ISA      the build of custom-operator libraries: auto (default: AVX-512 where
                        the CPU has it, else the portable build), avx512 or portable (the
                        portable build, GEMMs only, even on AVX-512 machines: tests,
                        benchmarks)
    WPK_POOL_SPIN_US    how long a kernel pool worker spins before sleeping, µs (default 25)
    WPK_POOL_PIN        1: pin kernel pool worker i to logical CPU i + 1 (default 0)
    WPK_MQTT_PASSWORD   wpk-bridge's broker password when the command line gives none

A malformed value is a one-line WpkError naming the variable.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from wpk.errors import WpkError


def _text(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise WpkError(f"environment variable {name}={value!r}: expected a whole number") \
            from None


def cache_dir() -> Path:
    """wpk's folder under the user cache (XDG_CACHE_HOME, else ~/.cache)."""
    return Path(_text("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "wpk"


def tuning_log() -> Path:
    return Path(_text("WPK_TUNING_LOG", str(Path.home() / ".cache" / "wpk" / "tuning.jsonl")))


def kernel_cache() -> Path:
    return Path(_text("WPK_KERNEL_CACHE", str(Path(tempfile.gettempdir()) / "wpk-kernels")))


def c_compiler() -> str:
    return _text("CC", "gcc")


KERNEL_ISAS = ("auto", "avx512", "portable")


def kernel_isa() -> str:
    value = _text("WPK_KERNEL_ISA", "auto").strip().lower()
    if value not in KERNEL_ISAS:
        raise WpkError(f"environment variable WPK_KERNEL_ISA={value!r}: expected one of "
                       f"{', '.join(KERNEL_ISAS)}")
    return value


def pool_spin_us() -> int:
    return _int("WPK_POOL_SPIN_US", 25)


def pool_pin() -> bool:
    return _int("WPK_POOL_PIN", 0) != 0


def mqtt_password() -> str | None:
    return os.environ.get("WPK_MQTT_PASSWORD")
