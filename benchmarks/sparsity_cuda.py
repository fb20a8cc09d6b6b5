"""The CUDA sparse GEMM (`wpk/optimizer/sparse_cuda.py`) against cuBLAS's dense SGEMM on the
same weights, on a GPU: BERT-base's projections at sequence 128 and ResNet-50's 1x1
convolutions as GEMMs (pixels x input channels), dense, tile-wise 50/75/90 % (the masks
`wpk-prune --pattern tile` makes) and 2:4. Both sides are timed with CUDA events in
interleaved rounds (fp32 on both: CuPy's matmul uses cuBLAS SGEMM and no TF32 unless
CUPY_TF32=1 is set, which this script refuses); each row reports the kernel's relative
error against cuBLAS's output.

Needs a CUDA GPU and CuPy (`pip install 'wpk[cupy]'`); exits with a message elsewhere.

    PYTHONPATH=. python benchmarks/sparsity_cuda.py [--rounds 10] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import numpy as np

from benchmarks.sparsity import PATTERNS, pruned_weight
from wpk.optimizer import sparse_cuda

# (label, M, K, N): Y [M, N] = X [M, K] @ W.T
SHAPES = [
    ("bert 128x768x768 (QKV/out)", 128, 768, 768),
    ("bert 128x768x3072 (FFN up)", 128, 768, 3072),
    ("bert 128x3072x768 (FFN down)", 128, 3072, 768),
    ("resnet 1x1 256->64 @56", 56 * 56, 256, 64),
    ("resnet 1x1 128->512 @28", 28 * 28, 128, 512),
    ("resnet 1x1 1024->256 @14", 14 * 14, 1024, 256),
    ("resnet 1x1 512->2048 @7", 7 * 7, 512, 2048),
]


def time_ms(cupy, fn, repeats: int) -> float:
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / repeats


def measure(cupy, label: str, m: int, k: int, n: int, pattern, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    weight = pruned_weight((n, k), pattern, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    packed = sparse_cuda.pack(weight, m)
    name = "wpk_sparse_gemm"
    kernel = cupy.RawKernel(sparse_cuda.lower(packed, name, bias=False), name)
    x_gpu, w_t = cupy.asarray(x), cupy.asarray(np.ascontiguousarray(weight.T))
    y, dense_y = cupy.zeros((m, n), cupy.float32), cupy.zeros((m, n), cupy.float32)
    args = (x_gpu, cupy.asarray(packed.weights),
            cupy.asarray(packed.rows if packed.rows.size else np.zeros(1, np.int32)),
            cupy.asarray(packed.offsets), cupy.zeros(1, cupy.float32), y)
    blocks, threads = sparse_cuda.grid(packed)
    ours = lambda: kernel(blocks, threads, args)  # noqa: E731
    dense = lambda: cupy.matmul(x_gpu, w_t, out=dense_y)  # noqa: E731
    ours()
    expected = dense()
    error = float(cupy.linalg.norm(y - expected) / max(float(cupy.linalg.norm(expected)), 1e-30))
    for fn in (ours, dense):
        time_ms(cupy, fn, 20)                  # warm: compile, cuBLAS heuristics, clocks
    ratios, ours_ms, dense_ms = [], [], []
    for _ in range(rounds):
        d, o = time_ms(cupy, dense, 50), time_ms(cupy, ours, 50)
        dense_ms.append(d)
        ours_ms.append(o)
        ratios.append(d / o)
    return dict(layer=label, kept=packed.kept_fraction, cublas_ms=statistics.median(dense_ms),
                wpk_ms=statistics.median(ours_ms), speedup=statistics.median(ratios),
                low=min(ratios), high=max(ratios), error=error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if os.environ.get("CUPY_TF32", "0") != "0":
        raise SystemExit("sparsity_cuda: unset CUPY_TF32: cuBLAS would run TF32, not fp32")
    try:
        import cupy
        device = cupy.cuda.Device(0)
        gpu = cupy.cuda.runtime.getDeviceProperties(device.id)["name"].decode()
    except Exception as error:       # as optimizer_cuda.py: a skip, not a failure
        print(f"sparsity_cuda: skipped ({type(error).__name__}: {error}); "
              "needs a CUDA GPU and CuPy")
        return
    lines = [f"GPU: {gpu}; {args.rounds} interleaved rounds of 50 launches per side; "
             "speedup = cuBLAS SGEMM time / wpk time, median [min-max] over rounds", "",
             "| layer | pattern | work kept | cuBLAS ms | wpk ms | speedup | rel. error |",
             "|---|---|---|---|---|---|---|"]
    for label, m, k, n in SHAPES:
        for pattern_name, pattern in PATTERNS:
            r = measure(cupy, label, m, k, n, pattern, args.rounds)
            lines.append(f"| {label} | {pattern_name} | {r['kept']:.0%} | "
                         f"{r['cublas_ms']:.4f} | {r['wpk_ms']:.4f} | {r['speedup']:.2f}x "
                         f"[{r['low']:.2f}-{r['high']:.2f}] | {r['error']:.0e} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
