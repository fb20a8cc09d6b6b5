"""OpenVINO's CPU plugin as a third-party candidate: the whole slice compiled by OpenVINO.

OpenVINO is optional (`pip install 'wpk[openvino]'`) and imported lazily. Precision is always
forced: on CPUs with AMX or AVX-512 BF16, OpenVINO's CPU plugin otherwise lowers f32 models to
bf16 on its own, which would slip a lossy result past the fp32 accuracy guard.
"""
from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from wpk.errors import WpkError

INSTALL_HINT = "pip install 'wpk[openvino]'"
PROVIDER = "OpenVINO-CPU"
# candidate precision -> OpenVINO INFERENCE_PRECISION_HINT; lossy ones need --accuracy-budget
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}

_warned: set[str] = set()


class OpenVinoWarning(RuntimeWarning):
    """OpenVINO was wanted but is not used (not installed, or it failed to compile)."""


def import_openvino() -> Any | None:
    """The `openvino` module, or None when it is not installed (or does not import)."""
    try:
        return importlib.import_module("openvino")
    except Exception:  # ImportError, or a broken install raising something else
        return None


def missing_reason() -> str | None:
    """None when OpenVINO can compile for its CPU plugin here; otherwise why not."""
    ov = import_openvino()
    if ov is None:
        return f"openvino is not installed ({INSTALL_HINT})"
    try:
        if "CPU" not in ov.Core().available_devices:
            return "openvino has no CPU device on this machine"
    except Exception as error:
        return f"openvino does not start: {error}"[:200]
    return None


def warn_once(key: str, message: str) -> None:
    """Say something once per process (the optimizer and loader call this per slice)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, OpenVinoWarning, stacklevel=3)


def compile_config(precision_hint: str, threads: int) -> dict[str, Any]:
    """CPU plugin settings. LATENCY: one stream, every thread on one request, which is how a
    tier runs its slice (one request at a time per caller); THROUGHPUT would split the cores
    into streams that only parallel requests fill. `threads` 0: OpenVINO's own choice."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision_hint,
                              "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class PrecisionMismatch(RuntimeError):
    """The CPU plugin would not run the recorded precision (e.g. bf16 on a CPU without it)."""


def _input_spec(port: Any) -> tuple[np.dtype, tuple[int, ...] | None]:
    """An input port's numpy dtype and shape (-1 for a dynamic dimension; None: any rank)."""
    shape = port.get_partial_shape()
    dims = tuple(d.get_length() if d.is_static else -1 for d in shape) \
        if shape.rank.is_static else None
    return np.dtype(port.get_element_type().to_dtype()), dims


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) if d >= 0 else "?" for d in shape) + "]"


def _read_onnx(path: Path) -> Any:
    """The ONNX file as an OpenVINO model, read by the ONNX frontend only: `Core.read_model`
    tries every frontend, and on a corrupt file the TensorFlow one prints parse errors."""
    from openvino.frontend import FrontEndManager

    frontend = FrontEndManager().load_by_framework("onnx")
    return frontend.convert(frontend.load(str(path)))


def error_line(error: BaseException) -> str:
    """OpenVINO's errors stack `Exception from src/...` lines above the one that says what
    went wrong: that last line, shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1].lstrip("- ") if lines else type(error).__name__)[:160]


# Compiles one segment and exits; run with the current directory off sys.path, so that a
# folder named `wpk` there cannot shadow the installed package.
_COMPILE_CHILD = ("import json, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
                  "from pathlib import Path; "
                  "from wpk.optimizer.openvino_backend import OpenVinoSegment; "
                  "OpenVinoSegment(Path(sys.argv[1]), json.loads(sys.argv[2]))")


def crash_reason(directory: Path, entry: dict, timeout_s: float = 600) -> str | None:
    """Why compiling this segment would kill the process, or None. OpenVINO's CPU plugin
    is native code: some graphs crash it (2026.4 segfaulted on a QDQ int8 SqueezeNet), so
    it compiles in a child first, and a crash costs a candidate, never the caller."""
    try:
        result = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, str(directory),
                                 json.dumps(entry)], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"OpenVINO took over {timeout_s:.0f} s to compile it"
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        return f"OpenVINO crashed compiling it ({name})"
    return None   # a Python error is raised again, with its message, by the real compile


def _hint_name(value: Any) -> str:
    """OpenVINO reports precisions as element types (`<Type: 'bfloat16'>`): back to hints."""
    text = str(getattr(value, "get_type_name", lambda: value)()).lower()
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(text, text)


class OpenVinoSegment:
    """A model compiled by OpenVINO's CPU plugin; runs like an ORT session.

    Infer requests are not thread-safe, so each calling thread gets its own (the runtime may
    call `run` from several threads, as ONNX Runtime allows)."""

    provider = PROVIDER

    def __init__(self, directory: Path, entry: dict):
        ov = import_openvino()
        if ov is None:
            raise ImportError(f"openvino is not installed ({INSTALL_HINT})")
        self.inputs, self.outputs = list(entry["inputs"]), list(entry["outputs"])
        self.model_file = entry["model"]
        self.precision_hint = entry.get("precision_hint", "f32")
        self.compiled = ov.Core().compile_model(_read_onnx(directory / self.model_file), "CPU",
                                                compile_config(self.precision_hint,
                                                               int(entry.get("threads", 0))))
        self.actual_precision = _hint_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        if self.actual_precision != self.precision_hint:
            raise PrecisionMismatch(f"OpenVINO runs INFERENCE_PRECISION_HINT="
                                    f"{self.precision_hint} as {self.actual_precision} here")
        self._ports = {}
        for port in self.compiled.outputs:
            for name in port.get_names():
                self._ports[name] = port
        missing = [n for n in self.outputs if n not in self._ports]
        if missing:
            raise RuntimeError(f"OpenVINO model has no output {missing[0]!r}")
        self._expected = {name: _input_spec(port) for port in self.compiled.inputs
                          for name in port.get_names() if name in self.inputs}
        missing = [n for n in self.inputs if n not in self._expected]
        if missing:
            raise RuntimeError(f"OpenVINO model has no input {missing[0]!r}")
        self._local = threading.local()

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray],
            run_options: Any = None) -> list[np.ndarray]:
        names = list(output_names) if output_names else self.outputs
        unknown = [n for n in names if n not in self._ports]
        if unknown:
            raise WpkError(f"OpenVINO slice has no output {unknown[0]!r} "
                           f"(outputs: {', '.join(self.outputs)})")
        # share_outputs=False: the arrays returned are copies, not views of the request's
        # buffers that the next call on this thread would overwrite
        result = self._request().infer(self._checked(feeds), share_inputs=True,
                                       share_outputs=False)
        return [result[self._ports[n]] for n in names]

    def _checked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds, refused as ONNX Runtime refuses them. OpenVINO itself would cast a wrong
        dtype silently and, for a missing input, reuse the tensor this request ran on last."""
        unknown = [n for n in feeds if n not in self._expected]
        if unknown:
            raise WpkError(f"OpenVINO slice has no input {unknown[0]!r} "
                           f"(inputs: {', '.join(self._expected)})")
        checked = {}
        for name, (dtype, shape) in self._expected.items():
            if name not in feeds:
                raise WpkError(f"OpenVINO slice: input {name!r} is missing from the feeds")
            value = np.asarray(feeds[name])
            if value.dtype != dtype:
                raise WpkError(f"OpenVINO slice: input {name!r} is {value.dtype}, the model "
                               f"takes {dtype}")
            if shape is not None and (value.ndim != len(shape) or any(
                    want >= 0 and got != want for got, want in zip(value.shape, shape))):
                raise WpkError(f"OpenVINO slice: input {name!r} has shape {list(value.shape)}, "
                               f"the model takes " + _shape_text(shape))
            checked[name] = value
        return checked

    def __call__(self, env: dict[str, np.ndarray]) -> None:
        values = self.run(self.outputs, {n: env[n] for n in self.inputs})
        env.update(zip(self.outputs, values))
