"""The portable build of the sparse GEMM custom operator (`portable_simd.py`'s shim in place of
AVX-512): compiled here for x86-64-v3 (AVX2 pairs) and checked against ONNX Runtime's dense
operator inside its own session; the shim's activations against NumPy; the search offering
GEMMs only; and a compile-only check for aarch64 (its code cannot run on this machine)."""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess

import numpy as np
import onnxruntime as ort
import pytest

from tests.optimizer.test_optimizer_direct_conv import (GEMM_CASES, RNG, _custom_op_session,
                                                        _gemm_model, _offline, _sparse_cnn,
                                                        _weight)
from wpk.optimizer import build, direct_conv, ort_ops, passes
from wpk.optimizer.executor import MANIFEST, load
from wpk.optimizer.pipeline import save_custom_ops
from wpk.optimizer.selection import select_custom_ops
from wpk.optimizer.session import DEFAULT_SESSION

V3 = ort_ops.portable_target() == "x86-64-v3"
# the tests that run the portable build (the cross-compile and source checks need neither)
needs_v3 = pytest.mark.skipif(not V3 or not ort_ops.portable_runs_here()[0],
                              reason="the portable build is run here for x86-64-v3: this CPU "
                              "lacks AVX2/FMA or there is no C compiler")


@needs_v3
@pytest.mark.parametrize("case", GEMM_CASES)
def test_portable_gemm_matches_onnxruntime_inside_its_session(case, tmp_path):
    m, k, n, op, pattern = case
    weight = _weight(n, k, 1, pattern).reshape(n, k)
    model = _gemm_model(m, k, n, op, weight)
    offline = _offline(model, tmp_path)
    sites = ort_ops.gemm_sites(offline, model)
    kernel = ort_ops.op_kernel(sites[0], 0, isa="portable")
    assert kernel.isa == "portable"
    session = _custom_op_session(ort_ops.build_library([kernel]),
                                 ort_ops.custom_op_model(offline, sites))
    feed = {"X": RNG.standard_normal(session.get_inputs()[0].shape).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    for _ in range(3):      # split over the threads: the same answer on every run
        got = session.run(None, feed)[0]
        assert got.shape == expected.shape
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5


@needs_v3
def test_portable_library_is_built_without_avx512(tmp_path):
    """x86-64-v3 flags, 32-byte AVX2 registers and FMAs, no 64-byte (zmm) register."""
    assert "-march=x86-64-v3" in ort_ops.object_flags("portable")
    assert "-march=x86-64-v4" in ort_ops.object_flags("avx512")
    model = _gemm_model(64, 128, 64, "MatMul", _weight(64, 128, 1, "tile").reshape(64, 128))
    offline = _offline(model, tmp_path)
    library = ort_ops.build_library([ort_ops.op_kernel(ort_ops.gemm_sites(offline, model)[0],
                                                       0, isa="portable")])
    code = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True,
                          check=True).stdout
    assert "zmm" not in code
    assert "ymm" in code and "vfmadd" in code
    assert ort_ops.target_runs_here(ort_ops.library_target("portable")) == (True, "")


@pytest.mark.skipif(not ort_ops.runs_here()[0], reason="NCHWc sites: " + ort_ops.runs_here()[1])
def test_portable_build_refuses_nchwc_kernels(tmp_path):
    model = _sparse_cnn("tile")
    model, _ = passes.run_passes(model)
    offline = _offline(model, tmp_path)
    site = ort_ops.direct_sites(offline, model)[0]
    with pytest.raises(Exception, match="need AVX-512"):
        ort_ops.op_kernel(site, 0, isa="portable")


HARNESS = r"""
#include <stdlib.h>
void wpk_pool_run(void (*fn)(int, int, void*), void* ctx, int total) {
  for (int i = 0; i < total; ++i) fn(i, 0, ctx);
}
float* wpk_thread_scratch(size_t floats) { static float* s; free(s); s = malloc(floats * 4);
                                           return s; }
void wpk_kernel_failed(const char* why) { (void)why; abort(); }
"""


@needs_v3
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
@pytest.mark.parametrize("act", ["relu", "clip:-1.0:1.0", "hardswish", "swish:1.0"])
def test_portable_epilogues_match_numpy(act, march):
    """Bias and every fused activation through the shim (the GEMM sites found today fuse
    none, but the shim must compute what the AVX-512 intrinsics do), with 8-float pieces
    (AVX2) and with 4-float ones (baseline x86-64's SSE: the layout NEON gets too)."""
    shape = direct_conv.DirectShape(c=40, k=32, h=1, w=9, kh=1, kw=1, act=act, threads=1,
                                    layout="rows")
    weight = _weight(32, 40, 1, "tile")
    groups = direct_conv.groups_for(shape, weight)
    source = direct_conv.lower(shape, groups, "kernel", portable=True) + HARNESS
    flags = [f for f in ort_ops.object_flags("portable")   # the harness links by name
             if not f.startswith(("-D", "-fvisibility", "-march="))]
    library = ctypes.CDLL(str(build.compile_c(source, "portable_epilogue",
                                              [*flags, f"-march={march}", "-shared"])))
    x = RNG.standard_normal((9, 40)).astype(np.float32) * 4
    bias = RNG.standard_normal(32).astype(np.float32)
    y = np.zeros((9, 32), np.float32)
    u = direct_conv.pack_parameters(shape, weight, groups)
    library.kernel.argtypes = [ctypes.c_void_p] * 5
    library.kernel(*(a.ctypes.data for a in (x, u, bias)), None, y.ctypes.data)
    expected = direct_conv.reference(shape, x, weight, bias)
    assert np.allclose(y, expected, rtol=1e-5, atol=1e-5)


@needs_v3
def test_search_offers_only_gemms_in_the_portable_build(tmp_path, monkeypatch):
    """WPK_KERNEL_ISA=portable: a sparse convolution stays ONNX Runtime's, a sparse GEMM is
    a site, and the optimized directory records the x86-64-v3 target and runs its
    library."""
    monkeypatch.setenv("WPK_KERNEL_ISA", "portable")
    assert ort_ops.library_isa() == "portable"
    model, _ = passes.run_passes(_sparse_cnn("tile"))
    offline = _offline(model, tmp_path)
    feed = {"image": RNG.standard_normal((1, 16, 14, 14)).astype(np.float32)}
    names = [o.name for o in model.graph.output]
    assert select_custom_ops(model, offline, dict(DEFAULT_SESSION), feed, names, passes=0,
                             start_with_kernels=True) is None
    weight = _weight(64, 96, 1, "tile").reshape(64, 96)
    model = _gemm_model(32, 96, 64, "MatMul", weight)
    offline = _offline(model, tmp_path)
    feed = {"X": RNG.standard_normal((1, 32, 96)).astype(np.float32)}
    inside = select_custom_ops(model, offline, dict(DEFAULT_SESSION), feed, ["Y"], passes=0,
                               start_with_kernels=True)
    assert inside is not None and inside.isa == "portable"
    assert [s.op for s in inside.specs] == ["direct_gemm"]
    expected = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = _custom_op_session(inside.library, inside.model).run(None, feed)[0]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5
    directory = save_custom_ops(model, inside, tmp_path / "opt")
    segment = json.loads((directory / MANIFEST).read_text())["segments"][0]
    assert segment["library_target"] == "x86-64-v3"
    session = load(directory)
    assert session.segments[0].model_file == "model.wpk.onnx"
    got = session.run(None, feed)[0]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="no aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu)")
@pytest.mark.parametrize("pattern", ["tile", "dense"])
def test_portable_gemm_cross_compiles_for_aarch64(pattern, tmp_path):
    """Compile only: the kernel's translation unit (shim included) for aarch64 NEON. It
    cannot run on this x86-64 machine, so only the compiler's acceptance and the object's
    instruction set are checked."""
    shape = direct_conv.DirectShape(c=768, k=768, h=1, w=128, kh=1, kw=1, act="relu",
                                    threads=2, layout="rows")
    weight = _weight(768, 768, 1, pattern)
    source = tmp_path / "kernel.c"
    source.write_text(direct_conv.lower(shape, direct_conv.groups_for(shape, weight),
                                        "wpk_direct_0", portable=True))
    result = subprocess.run(["aarch64-linux-gnu-gcc", "-O3", "-fPIC", "-fno-math-errno",
                             "-c", str(source), "-o", str(tmp_path / "kernel.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    dump = shutil.which("aarch64-linux-gnu-objdump")
    if dump:
        code = subprocess.run([dump, "-d", str(tmp_path / "kernel.o")], capture_output=True,
                              text=True, check=True).stdout
        assert "fmla" in code and ".4s" in code      # NEON fused multiply-adds, 4 floats


def test_kernels_call_only_shimmed_intrinsics():
    """Every `_mm512_` function a direct kernel (with any activation) calls is one the shim
    defines."""
    import re

    from wpk.optimizer import activations, portable_simd

    for act in ("", "relu", "clip:0.0:6.0", "hardswish", "swish:1.0"):
        shape = direct_conv.DirectShape(c=32, k=64, h=1, w=20, kh=1, kw=1, act=act,
                                        layout="rows")
        weight = _weight(64, 32, 1, "dead-block")
        source = direct_conv.lower(shape, direct_conv.groups_for(shape, weight), "k",
                                   portable=True) + activations.C_HELPERS
        body = source.replace(portable_simd.HEADER, "")
        called = set(re.findall(r"_mm512_(\w+)\(", body))
        assert called <= set(portable_simd.SHIMMED), called - set(portable_simd.SHIMMED)


def test_kernel_isa_setting_picks_the_build(monkeypatch):
    """Unset, an AVX-512 machine keeps its AVX-512 build; a value outside the three is a
    one-line error naming the variable."""
    from wpk.errors import WpkError

    monkeypatch.delenv("WPK_KERNEL_ISA", raising=False)
    assert ort_ops.library_isa() == ("avx512" if ort_ops.runs_here()[0] else "portable")
    monkeypatch.setenv("WPK_KERNEL_ISA", "neon")
    with pytest.raises(WpkError, match="WPK_KERNEL_ISA"):
        ort_ops.library_isa()
