"""Execute an optimized slice: `load(DIR)` returns a session with ONNX Runtime's
`run(output_names, feeds)` signature (plus get_inputs / get_outputs, which give
`wpk.tensor_spec.TensorSpec`s, and get_providers).

An optimized directory holds `optimized.json` and either one ONNX model run by one configured
ONNX Runtime session, or a list of segments run in order by a segment executor: ONNX Runtime
sub-sessions for runs of nodes ORT does best, generated kernels for the nodes where ours won.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from wpk.errors import WpkError
from wpk.tensor_spec import TensorSpec, ort_type_of

MANIFEST = "optimized.json"
FORMAT_VERSION = 1


def tensor_specs(entries: Sequence[Mapping[str, Any]]) -> list[TensorSpec]:
    """A manifest's "inputs" or "outputs": ONNX Runtime's NodeArg fields as JSON (name, shape
    with ints, None or dimension names, type text; a missing type is float)."""
    return [TensorSpec.from_ort(t["name"], t["shape"], t.get("type", ort_type_of("float32")))
            for t in entries]


class OrtSegment:
    def __init__(self, directory: Path, entry: dict, session_config: dict,
                 spinning: bool = True):
        from wpk.optimizer.session import make_session

        self.inputs, self.outputs = entry["inputs"], entry["outputs"]
        self.session = None
        offline = entry.get("offline_model")
        library = _custom_ops_library(directory, entry)
        if library and offline and not (directory / offline).exists():
            _warn_plain(directory, f"{directory / offline} is missing")
        if offline and (directory / offline).exists() and library is not False:
            try:  # the tier's own ORT-optimized graph; it may not load on other hardware
                self.session = make_session(str(directory / offline), session_config,
                                            offline_optimized=True, spinning=spinning,
                                            custom_ops=library)
                self.model_file = offline
            except Exception as error:
                self.session = None
                if library:
                    _warn_plain(directory, str(error).splitlines()[0][:160])
        if self.session is None:
            self.session = make_session(str(directory / entry["model"]), session_config,
                                        spinning=spinning)
            self.model_file = entry["model"]

    def __call__(self, env: dict[str, np.ndarray]) -> None:
        values = self.session.run(self.outputs, {n: env[n] for n in self.inputs})
        env.update(zip(self.outputs, values))


def _custom_ops_library(directory: Path, entry: dict) -> str | None | bool:
    """The segment's custom-operator library (generated kernels inside ONNX Runtime), None
    if it has none, False if it has one that cannot run on this machine."""
    name = entry.get("custom_ops")
    if not name:
        return None
    from wpk.optimizer.ort_ops import LIBRARY_BUILD, target_runs_here

    # directories from before the portable build record no target: theirs is AVX-512
    ok, why = target_runs_here(entry.get("library_target", "x86-64-v4"))
    path = directory / name
    if not ok or not path.is_file():
        _warn_plain(directory, why if not ok else f"{path} is missing")
        return False
    if entry.get("library_build", 1) < LIBRARY_BUILD:
        _warn_plain(directory, f"{path} was built by an older wpk whose kernels could give "
                    f"wrong results on many cores; run wpk-optimize again")
        return False
    return str(path)


def _warn_plain(directory: Path, why: str) -> None:
    from wpk.optimizer.openvino_backend import warn_once

    warn_once(f"custom-ops:{directory}", f"{directory}: serving this slice without its "
              f"generated kernels ({why}): plain ONNX Runtime, same results, slower")


class KernelSegment:
    def __init__(self, directory: Path, entry: dict):
        from wpk.optimizer.kernels import BoundKernel, KernelSpec

        spec = KernelSpec(**{k: v for k, v in entry["spec"].items()})
        spec.params = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.params.items()}
        if entry.get("weights"):
            with np.load(directory / entry["weights"]) as data:
                spec.weights = {k: data[k] for k in data.files}
        if spec.op == "winograd":
            from wpk.optimizer.winograd import WinogradKernel

            self.kernel = WinogradKernel(spec)
        else:
            self.kernel = BoundKernel(spec)
        self.output = spec.output
        self.inputs = self.kernel.activations
        self.outputs = [spec.output]

    def __call__(self, env: dict[str, np.ndarray]) -> None:
        env[self.output] = self.kernel(env)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The directory's optimized.json, checked for presence, JSON and format version."""
    path = directory / MANIFEST
    if not path.exists():
        raise WpkError(f"{directory}: no {MANIFEST} (not written by wpk-optimize)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WpkError(f"{path}: not valid JSON (line {error.lineno})") from None
    if manifest.get("version") != FORMAT_VERSION:
        raise WpkError(f"{path}: unsupported format version {manifest.get('version')!r}")
    return manifest


def check_directory(directory: str | Path) -> None:
    """Every file the directory's segments name is there (before it is shipped elsewhere:
    loading falls back to plain ONNX Runtime where it can, a copy should not need to)."""
    directory = Path(directory)
    for entry in read_manifest(directory)["segments"]:
        for key in ("model", "offline_model", "custom_ops", "weights"):
            name = entry.get(key)
            if name and not (directory / name).is_file():
                raise WpkError(f"{directory / name}: missing from the optimized directory "
                               f"(run wpk-optimize again)")


class OptimizedSession:
    """Runs an optimized slice; drop-in for `onnxruntime.InferenceSession.run`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        self.manifest = read_manifest(self.directory)
        config = self.manifest["session"]
        self.segments: list[Any] = []
        mixed = any(entry["type"] == "kernel" for entry in self.manifest["segments"])
        for entry in self.manifest["segments"]:
            if entry["type"] == "ort":
                self.segments.append(OrtSegment(self.directory, entry, config,
                                                spinning=not mixed))
            elif entry["type"] == "kernel":
                self.segments.append(KernelSegment(self.directory, entry))
            elif entry["type"] == "openvino":
                self.segments.append(_openvino_or_ort(self.directory, entry, config,
                                                      spinning=not mixed))
            else:
                raise WpkError(f"{path}: unknown segment type {entry['type']!r}")
        self._inputs = tensor_specs(self.manifest["inputs"])
        self._outputs = tensor_specs(self.manifest["outputs"])
        self._output_names = [t.name for t in self._outputs]
        single = self.segments[0] if len(self.segments) == 1 else None
        # one session (ORT or OpenVINO): `run` calls it directly, no executor overhead at all
        self._single = single.session if isinstance(single, OrtSegment) else \
            single if single is not None and hasattr(single, "run") else None

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, np.ndarray],
            run_options: Any = None) -> list[np.ndarray]:
        names = list(output_names) if output_names else self._output_names
        if self._single is not None:
            return self._single.run(names, dict(input_feed), run_options)
        env: dict[str, np.ndarray] = dict(input_feed)
        for segment in self.segments:
            segment(env)
        try:
            return [env[n] for n in names]
        except KeyError as error:
            raise WpkError(f"optimized slice has no output {error.args[0]!r}") from None

    def get_inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        providers = []
        for segment in self.segments:
            names = segment.session.get_providers() if isinstance(segment, OrtSegment) \
                else [getattr(segment, "provider", "wpk.generated-c")]
            providers += [p for p in names if p not in providers]
        return providers

    @property
    def precision(self) -> str:
        return self.manifest.get("precision", "fp32")

    @property
    def candidate_kind(self) -> str | None:
        """Which candidate kind wpk-optimize chose ('onnxruntime', 'custom-ops', ...); None
        for directories written before manifests named it, or not by a decision."""
        return self.manifest.get("candidate_kind")


def _openvino_or_ort(directory: Path, entry: dict, session_config: dict,
                     spinning: bool) -> Any:
    """The OpenVINO segment the optimizer chose, or, where OpenVINO is not installed or cannot
    compile it, the same model on ONNX Runtime: an optimized slice never fails to serve for
    want of an optional backend."""
    from wpk.optimizer.openvino_backend import OpenVinoSegment, error_line, warn_once

    model = directory / entry["model"]
    if not model.is_file():
        raise WpkError(f"{model}: missing (the model of this slice's OpenVINO segment)")
    try:
        return OpenVinoSegment(directory, entry)
    except Exception as error:
        why = error_line(error)
    try:  # a model neither can load is broken, not a reason to blame OpenVINO
        segment = OrtSegment(directory, entry, session_config, spinning=spinning)
    except Exception as error:
        raise WpkError(f"{model}: neither OpenVINO ({why}) nor ONNX Runtime "
                       f"({str(error).splitlines()[0][:160]}) can load it") from None
    warn_once(f"load:{directory}", f"{directory}: the optimizer chose OpenVINO for this "
              f"slice, but it cannot run here ({why}); serving it with ONNX Runtime instead")
    return segment


def load(directory: str | Path) -> OptimizedSession:
    """Open a directory written by wpk-optimize."""
    return OptimizedSession(directory)
