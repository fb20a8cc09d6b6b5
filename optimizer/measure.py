"""Runner: time a callable on this machine, and name this machine's hardware."""
from __future__ import annotations

import functools
import os
import platform
import time
from typing import Callable

import numpy as np


def time_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3,
            max_seconds: float = 2.0) -> float:
    """Median wall time of `fn()` in milliseconds (robust to noise from other processes)."""
    for _ in range(warmup):
        fn()
    samples = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(samples) >= 3:
            break
    return float(np.median(samples) * 1e3)


def compare_ms(fns: dict[str, Callable[[], object]], rounds: int = 5, repeats: int = 10,
               warmup: int = 3, percentile: float = 20.0,
               settle_s: float = 0.0) -> dict[str, float]:
    """Interleave candidates block by block so that background load hits them alike, and
    return a low percentile of each one's samples: on a shared machine the distribution is
    bimodal (the second core free or busy), and the low percentile compares the candidates
    in the same (free) mode instead of by how often a neighbour got in the way.

    `settle_s`: pause before each block, for candidates from different runtimes: ONNX
    Runtime's intra-op threads keep spinning for 10-50 ms after its last run (measured on
    2 cores), which halved OpenVINO's speed in the block that followed."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for index in range(rounds):
        # rotate who goes first: whoever follows another session pays for its idle threads
        for name in names[index % len(names):] + names[:index % len(names)]:
            fn = fns[name]
            if settle_s:
                time.sleep(settle_s)
            fn()  # one unmeasured run lets other sessions' spinning threads go idle first
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: float(np.percentile(values, percentile) * 1e3)
            for name, values in samples.items()}


@functools.lru_cache(maxsize=1)
def hardware_id() -> str:
    """A short fingerprint: CPU model, logical cores, onnxruntime version (and GPU if any)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import onnxruntime

    return f"{model} x{os.cpu_count()} ort{onnxruntime.__version__}"
