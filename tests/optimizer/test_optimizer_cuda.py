"""Generated CUDA: compile-tested with nvcc everywhere; run and checked on a GPU only."""
import shutil

import numpy as np
import pytest

from wpk.optimizer import build, codegen_cuda, ops

COMPUTES = [
    ops.conv2d(1, 6, 15, 9, 9, 3, 3, (2, 2), (1, 0, 2, 1), (1, 1), 3, relu=True),
    ops.conv2d(1, 7, 12, 17, 7, 3, 3, (2, 1), (1, 1, 1, 1), (1, 1), 7),
    ops.gemm(3, 37, 29, False, True, bias="row", relu=True),
    ops.pool2d("max", 1, 5, 11, 8, 3, 3, (2, 2), (1, 1, 1, 0)),
    ops.pool2d("avg", 1, 5, 11, 8, 3, 3, (2, 2), (1, 1, 1, 0)),
    ops.global_avg_pool(1, 6, 7, 9),
]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("compute", COMPUTES, ids=lambda c: c.name)
def test_generated_cuda_compiles_to_ptx(compute):
    for config in list(codegen_cuda.cuda_space())[::11]:
        ptx = build.compile_ptx(codegen_cuda.lower_cuda(compute, config), compute.name)
        assert f".entry {compute.name}" in ptx


@pytest.mark.gpu
@pytest.mark.parametrize("compute", COMPUTES, ids=lambda c: c.name)
def test_generated_cuda_matches_c_kernel_on_gpu(compute):
    ok, why = build.pycuda_available()
    if not ok:
        try:
            import cupy
            cupy.cuda.runtime.getDeviceCount()
        except Exception:
            pytest.skip(why)
    from wpk.optimizer import codegen_c
    from wpk.optimizer.build import CKernel

    rng = np.random.default_rng(0)
    arrays = ops.random_buffers(compute, rng)
    cpu = [a.copy() for a in arrays]
    CKernel(codegen_c.lower_c(compute, ops.make_schedule(
        compute, ops.default_schedule_config(compute))), compute.name, len(cpu))(*cpu)
    out, _ = codegen_cuda.run_on_gpu(compute, {"block": 128, "unroll": 2,
                                               "reduce_order": "default"}, arrays)
    np.testing.assert_allclose(out, cpu[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compute", COMPUTES, ids=lambda c: c.name)
def test_generated_cuda_needs_no_headers(compute):
    """NVRTC, which CuPy compiles with, has no C library headers (max-pool's -FLT_MAX once
    pulled in <float.h> and failed there)."""
    for config in list(codegen_cuda.cuda_space())[::7]:
        assert "#include" not in codegen_cuda.lower_cuda(compute, config)
