"""Builder: compile generated C with gcc + OpenMP into a shared library and load it with
ctypes; compile generated CUDA to PTX with nvcc (and load it with pycuda where a GPU is)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from wpk import settings
from wpk.errors import WpkError

# Generated kernels share the cores with ONNX Runtime's own thread pool: OpenMP threads that
# spin-wait between kernels would steal them (catastrophic on 2 cores). Sleep instead; this must
# be set before libgomp loads, i.e. before the first kernel library is opened.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# GCC 12's predictive commoning (an -O3 pass) can carry an output vector across loop
# iterations: it loads the neighbour a *different thread* writes and stores the stale value
# back after the loop. Harmless on one thread, wrong results on many (seen on 16 cores: the
# Winograd NCHWc kernel lost tiles). Every generated kernel writes shared outputs in parallel.
NO_INVENTED_STORES = ["-fno-predictive-commoning"]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno",
          *NO_INVENTED_STORES]


def compiler() -> str:
    """The C compiler ($CC, default gcc), or a one-line error if there is none."""
    name = settings.c_compiler()
    if shutil.which(name) is None:
        raise WpkError(f"no C compiler {name!r} found: generated CPU kernels need gcc")
    return name


def run_compiler(args: list[str], what: str) -> None:
    """Run one compiler command; its failure is a one-line error naming `what` failed."""
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        first = result.stderr.strip().splitlines()[0] if result.stderr.strip() else ""
        raise WpkError(f"gcc failed on {what}: {first}")


def compile_c(source: str, name: str, flags: list[str] = CFLAGS, suffix: str = ".so",
              libraries: tuple[str, ...] = ("-lm",)) -> Path:
    """Compile once per distinct source and flags (content-addressed cache); returns the
    output's path: a shared library by default, an object file with flags [..., "-c"] and
    suffix ".o"."""
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    cache = settings.kernel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    output = cache / f"{name}_{digest}{suffix}"
    if not output.exists():
        src = cache / f"{name}_{digest}.c"
        src.write_text(source)
        # per process and thread: kernels of one library compile in parallel threads
        tmp = output.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        run_compiler([compiler(), *flags, str(src), "-o", str(tmp), *libraries],
                     f"generated kernel {name}")
        os.replace(tmp, output)
    return output


class CKernel:
    """A compiled kernel: call it with numpy float32 arrays in the compute's buffer order."""

    def __init__(self, source: str, name: str, n_buffers: int):
        self.source, self.name = source, name
        self.path = compile_c(source, name)
        self._lib = ctypes.CDLL(str(self.path))
        self._fn = getattr(self._lib, name)
        self._fn.restype = None
        self._fn.argtypes = [ctypes.c_void_p] * n_buffers

    def __call__(self, *arrays: np.ndarray) -> None:
        self._fn(*(a.ctypes.data for a in arrays))

    def pointers(self, *arrays: np.ndarray) -> tuple:
        """Pre-bound argument tuple for the hot path (no per-call attribute lookups)."""
        return tuple(a.ctypes.data for a in arrays)

    @property
    def raw(self):
        return self._fn


def compile_ptx(source: str, name: str, arch: str = "sm_90") -> str:
    """Compile CUDA source to PTX with nvcc (works without a GPU); returns the PTX text."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise WpkError("nvcc not found: cannot compile generated CUDA kernels")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.cu"
        src.write_text(source)
        ptx = Path(tmp) / f"{name}.ptx"
        result = subprocess.run([nvcc, "-ptx", f"-arch={arch}", str(src), "-o", str(ptx)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise WpkError(f"nvcc failed on generated kernel {name}: {result.stderr.strip()[:300]}")
        return ptx.read_text()


def pycuda_available() -> tuple[bool, str]:
    """(True, '') when pycuda imports and sees a GPU, else (False, why)."""
    try:
        import pycuda.driver as cuda  # noqa: F401
        import pycuda.autoinit  # noqa: F401
    except Exception as error:  # ImportError, or cuInit failing without a GPU
        return False, f"CUDA kernels skipped: pycuda unavailable ({type(error).__name__}: " \
                      f"{str(error).splitlines()[0] if str(error) else 'no GPU'})"
    return True, ""
