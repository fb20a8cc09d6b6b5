"""The CUDA sparse GEMM (`sparse_cuda.py`): its own source run on the CPU by `cuda_on_host`
(thread blocks in turn, each block's threads as real threads, `__syncthreads` a barrier) and
checked against NumPy; compiled to PTX by nvcc where it is installed; run on a GPU where
there is one."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.optimizer import cuda_on_host
from wpk.optimizer import build, sparse_cuda

RNG = np.random.default_rng(3)
PARAMETERS = ["const float*", "const float*", "const int*", "const int*", "const float*",
              "float*"]


def tile_pruned(n: int, k: int, ratio: float, tile: int = 128) -> np.ndarray:
    """W [n, k] with `ratio` of the reduction rows zero in each tile of `tile` columns."""
    weight = RNG.standard_normal((n, k)).astype(np.float32)
    for first in range(0, n, tile):
        dead = RNG.choice(k, int(round(ratio * k)), replace=False)
        weight[first:first + tile, dead] = 0.0
    return weight


def two_four(n: int, k: int) -> np.ndarray:
    weight = RNG.standard_normal((n, k)).astype(np.float32)
    groups = weight.reshape(n, k // 4, 4)
    smallest = np.argsort(np.abs(groups), axis=-1)[..., :2]
    np.put_along_axis(groups, smallest, 0.0, axis=-1)
    return groups.reshape(n, k)


CASES = [  # m, k, n, weight, bias
    (37, 70, 100, lambda n, k: tile_pruned(n, k, 0.75), True),    # ragged rows and columns
    (128, 256, 192, lambda n, k: tile_pruned(n, k, 0.5, tile=64), False),
    (64, 48, 64, lambda n, k: RNG.standard_normal((n, k)).astype(np.float32), True),  # dense
    (5, 64, 128, lambda n, k: np.zeros((n, k), np.float32), True),  # nothing kept: the bias
]


def _on_host(packed: sparse_cuda.SparseGemm, x: np.ndarray, bias: np.ndarray | None):
    library = cuda_on_host.compile_kernel(sparse_cuda.lower(packed, "k", bias is not None),
                                          "k", PARAMETERS)
    y = np.full((packed.m, packed.n), np.nan, np.float32)
    arrays = [np.ascontiguousarray(x, np.float32), packed.weights,
              packed.rows if packed.rows.size else np.zeros(1, np.int32), packed.offsets,
              np.zeros(1, np.float32) if bias is None else bias, y]
    cuda_on_host.launch(library, arrays, *sparse_cuda.grid(packed))
    return y


@pytest.mark.skipif(not cuda_on_host.available(), reason="needs g++ for the host emulation")
@pytest.mark.parametrize("case", CASES, ids=["tile75-ragged", "tile50", "dense", "all-zero"])
def test_the_kernel_source_computes_the_gemm(case):
    m, k, n, make, with_bias = case
    weight = make(n, k)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    bias = RNG.standard_normal(n).astype(np.float32) if with_bias else None
    packed = sparse_cuda.pack(weight, m)
    expected = x.astype(np.float64) @ weight.T.astype(np.float64) + \
        (0 if bias is None else bias)
    np.testing.assert_allclose(_on_host(packed, x, bias), expected, rtol=1e-4, atol=1e-4)


def test_kept_rows_follow_the_pattern():
    """Tile-wise 75 % keeps a quarter of the work; 2:4 keeps all of it (the union of 64
    columns' rows is dense), as the module says; a dense weight all of it."""
    assert sparse_cuda.pack(tile_pruned(256, 512, 0.75), 128).kept_fraction == \
        pytest.approx(0.25, abs=0.01)
    assert sparse_cuda.pack(two_four(256, 512), 128).kept_fraction == pytest.approx(1.0)
    packed = sparse_cuda.pack(np.ones((100, 32), np.float32), 1)
    assert packed.groups == 2 and packed.kept_fraction == 1.0
    # the second group's padded columns (100..127) carry zeros in the packed weights
    assert not packed.weights.reshape(-1, sparse_cuda.GROUP)[32:, 36:].any()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_the_kernel_compiles_to_ptx():
    packed = sparse_cuda.pack(tile_pruned(768, 768, 0.75), 128)
    for bias in (True, False):
        ptx = build.compile_ptx(sparse_cuda.lower(packed, "wpk_sparse_gemm", bias),
                                "wpk_sparse_gemm")
        assert ".entry wpk_sparse_gemm" in ptx and ".shared" in ptx


@pytest.mark.gpu
def test_the_kernel_matches_numpy_on_a_gpu():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        pytest.skip(f"needs CuPy and a CUDA GPU ({type(error).__name__})")
    m, k, n = 128, 768, 3072
    weight = tile_pruned(n, k, 0.75)
    x = RNG.standard_normal((m, k)).astype(np.float32)
    bias = RNG.standard_normal(n).astype(np.float32)
    got, _ = sparse_cuda.run_on_gpu(sparse_cuda.pack(weight, m), x, bias)
    np.testing.assert_allclose(got, x.astype(np.float64) @ weight.T + bias, rtol=1e-3,
                               atol=1e-3)
