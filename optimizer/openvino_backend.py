"""OpenVINO's CPU plugin as a third-party candidate: the whole slice compiled by OpenVINO.

OpenVINO is optional (`pip install 'wpk[openvino]'`) and imported lazily. Precision is always
forced: on CPUs with AMX or AVX-512 BF16, OpenVINO's CPU plugin otherwise lowers f32 models to
bf16 on its own, which would slip a lossy result past the fp32 accuracy guard.
"""
from __future__ import annotations

import importlib
import threading
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

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
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision_hint,
                              "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class PrecisionMismatch(RuntimeError):
    """The CPU plugin would not run the recorded precision (e.g. bf16 on a CPU without it)."""


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
        core = ov.Core()
        self.compiled = core.compile_model(str(directory / self.model_file), "CPU",
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
        self._local = threading.local()

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray],
            run_options: Any = None) -> list[np.ndarray]:
        names = list(output_names) if output_names else self.outputs
        result = self._request().infer(dict(feeds), share_inputs=True, share_outputs=False)
        return [result[self._ports[n]] for n in names]

    def __call__(self, env: dict[str, np.ndarray]) -> None:
        values = self.run(self.outputs, {n: env[n] for n in self.inputs})
        env.update(zip(self.outputs, values))
