"""Measure a model's per-node times on this machine with ONNX Runtime's profiler.

Shared by `wpk-profile` and the partitioner's `--profile-local`. Imports only the core
dependencies (numpy, onnx, onnxruntime, jsonschema, rich) so that it runs on a small board.

How a profile is measured:
- The model (with wpk's stable node names, `wpk.naming`) runs in one ONNX Runtime session with
  the optimizations a deployment uses (ORT_ENABLE_ALL by default), sequential execution,
  `threads` intra-op threads, on random inputs; `warmup` runs, then `runs` timed runs.
- Each run's wall time (around `session.run`) gives the whole-model median and p90.
- Each run's kernel times come from ORT's profiler (Chrome trace: `cat == "Node"` events, `dur`
  in µs, grouped into runs by the `model_run` events) and are attributed to the model's nodes
  by `wpk.attribution`. The rest of the run's wall time (executor and binding overhead) is
  shared equally by the run's kernels, so each run's node times add up to its wall time.
- A node's time is its median over the runs, scaled by one factor so that the node times add
  up to the whole-model median (per-node medians drop the stray slow kernel that a typical
  run has somewhere); the factor is recorded as `attribution.scale` (close to 1).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from wpk.attribution import build_kernel_map
from wpk.errors import ParameterError, WpkError, ort_error_line
from wpk.feeds import random_feeds
from wpk.graph import Graph
from wpk.hostinfo import host_info, physical_cores
from wpk.profile_format import (PROFILE_VERSION, Profile, ProfileMismatchWarning,
                                load_profile, read_profile_document, save_profile,
                                validate_profile)

__all__ = ["profile_model", "load_profile", "save_profile", "validate_profile",
           "read_profile_document", "Profile", "ProfileMismatchWarning", "resolve_provider",
           "PROVIDER_ALIASES", "DEFAULT_WARMUP", "DEFAULT_RUNS"]

DEFAULT_WARMUP = 5
DEFAULT_RUNS = 20

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
}

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def resolve_provider(provider: str) -> str:
    """'cuda' or 'CUDAExecutionProvider' -> 'CUDAExecutionProvider', if this ORT has it."""
    full = PROVIDER_ALIASES.get(provider.lower(), provider)
    available = ort.get_available_providers()
    if full not in available:
        short = {v: k for k, v in PROVIDER_ALIASES.items() if k != "trt"}
        names = ", ".join(short.get(p, p) for p in available)
        raise WpkError(f"provider {provider!r} is not in this onnxruntime "
                       f"({ort.__version__}; available: {names})")
    return full


def random_inputs(graph: Graph) -> dict[str, np.ndarray]:
    """Inputs of the right shapes and types: normal floats, zeros for integers (safe indices)."""
    return random_feeds({name: (graph.tensors[name].shape, graph.tensors[name].dtype)
                         for name in graph.inputs}, seed=0)


def _session(model_file: Path, provider: str, threads: int, optimization: str,
             trace_prefix: Path, optimized_file: Path | None,
             custom_ops: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if custom_ops is not None:
        options.register_custom_ops_library(str(custom_ops))
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(trace_prefix)
    # quiet: the NCHWc "hardware specific" notice is expected, and a model that fails to load
    # would add a profiler error line above our one-line message
    options.log_severity_level = 4
    if optimized_file is not None:
        options.optimized_model_filepath = str(optimized_file)
    providers = [provider] if provider == "CPUExecutionProvider" \
        else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(str(model_file), options, providers=providers)


def _open_session(model_file: Path, provider: str, threads: int, optimization: str,
                  workdir: Path, label: str, custom_ops: Path | None = None
                  ) -> tuple[ort.InferenceSession, onnx.ModelProto | None]:
    """A profiling session plus the optimized graph it runs (None if ORT cannot save it)."""
    optimized_file = workdir / "optimized.onnx"
    ort.set_default_logger_severity(3)   # a failing session's profiler notices: not for users
    try:
        session = _session(model_file, provider, threads, optimization, workdir / "trace",
                           optimized_file, custom_ops)
    except Exception as first_error:  # compiled EP partitions cannot be serialized
        try:
            session = _session(model_file, provider, threads, optimization,
                               workdir / "trace", None, custom_ops)
        except Exception:
            raise WpkError(f"{label}: onnxruntime cannot load the model with {provider}: "
                           f"{ort_error_line(first_error)}") from None
    if session.get_providers()[0] != provider:
        raise WpkError(f"{label}: onnxruntime fell back from {provider} to "
                       f"{session.get_providers()[0]} (no device or driver for it here?)")
    optimized = None
    if optimized_file.exists():
        try:
            optimized = onnx.load(str(optimized_file), load_external_data=False)
        except Exception:
            optimized = None
    return session, optimized


def kernel_times_per_run(trace: list[dict[str, Any]], runs: int) -> list[dict[str, float]]:
    """Kernel name -> ms for each of the last `runs` model runs in an ORT trace."""
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace
                     if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(windows) < runs:
        raise WpkError(f"onnxruntime's profiler recorded {len(windows)} runs, expected {runs}")
    windows = windows[-runs:]
    starts = [w[0] for w in windows]
    per_run: list[dict[str, float]] = [{} for _ in windows]
    for event in trace:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if i < 0 or event["ts"] > windows[i][1]:
            continue  # a warmup run
        kernel = name[: -len("_kernel_time")]
        per_run[i][kernel] = per_run[i].get(kernel, 0.0) + event["dur"] / 1000.0
    return per_run


def progress_bar(enabled: bool, total: int, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeRemainingColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True, disable=not enabled)
    task = progress.add_task(label, total=total)
    return progress, task


def profile_model(model_path: str | os.PathLike, provider: str = "cpu",
                  threads: int | None = None, warmup: int = DEFAULT_WARMUP,
                  runs: int = DEFAULT_RUNS,
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  name: str | None = None, progress: bool = True,
                  optimization: str = "all", run_model: Path | None = None,
                  custom_ops: Path | None = None) -> dict[str, Any]:
    """Measure `model_path` here; returns the profile document (see docs/profile-format.md).

    `name` is the device's name in the profile (default: this host's name); `threads` the
    intra-op threads (default: physical cores, as ORT's own default). `run_model`: run this
    equivalent graph instead (an optimized slice, e.g. with the custom operators of
    `custom_ops`, a library to register) and attribute its kernels to `model_path`'s nodes,
    so that a plan prices the slice as it will really run.
    """
    _check_arguments(runs, warmup, threads, optimization)
    graph = Graph.load(model_path, input_shapes)
    full_provider = resolve_provider(provider)
    threads = threads or physical_cores()
    feeds = random_inputs(graph)

    with tempfile.TemporaryDirectory(prefix="wpk-profile-") as tmp:
        workdir = Path(tmp)
        model_file = workdir / "model.onnx"
        large = graph.model.ByteSize() > 1_500_000_000
        onnx.save(graph.model, str(model_file), save_as_external_data=large)
        session, optimized = _open_session(Path(run_model) if run_model else model_file,
                                           full_provider, threads, optimization, workdir,
                                           graph.name, custom_ops)
        walls = _timed_runs(session, feeds, warmup + runs, graph.name, progress)
        trace = json.loads(Path(session.end_profiling()).read_text())

    walls = walls[warmup:]
    node_ms, total_median, stats = _node_times(graph, optimized, trace, walls, runs)
    host = host_info()
    return {
        "version": PROFILE_VERSION,
        "device": {"name": name or host["hostname"] or "unnamed",
                   "provider": full_provider, "threads": threads, "host": host,
                   "onnxruntime": ort.__version__},
        "model": {"name": graph.name, "sha256": graph.sha256},
        "runs": runs,
        "warmup": warmup,
        "total_ms": {"median": round(total_median, 6),
                     "p90": round(float(np.percentile(walls, 90)), 6)},
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "optimization": optimization,
        "input_shapes": {t: list(graph.tensors[t].shape) for t in graph.inputs},
        "attribution": stats,
        **({"ran": {"model": Path(run_model).name,
                    "custom_ops": Path(custom_ops).name if custom_ops else None}}
           if run_model else {}),
        "nodes": [{"name": node.name, "op_type": node.op_type, "ms": round(float(ms), 6)}
                  for node, ms in zip(graph.nodes, node_ms)],
    }


def _check_arguments(runs: int, warmup: int, threads: int | None, optimization: str) -> None:
    if runs < 1 or warmup < 0:
        raise ParameterError("{runs} must be at least 1 and {warmup} at least 0", "runs",
                             "warmup")
    if threads is not None and threads < 1:
        raise ParameterError("{threads} must be at least 1", "threads")
    if optimization not in OPTIMIZATION_LEVELS:
        raise WpkError(f"unknown optimization level {optimization!r} "
                       f"({', '.join(OPTIMIZATION_LEVELS)})")


def _timed_runs(session, feeds: dict[str, np.ndarray], count: int, label: str,
                progress: bool) -> list[float]:
    """Wall times (ms) of `count` runs of `session` on `feeds`, under a progress bar."""
    walls: list[float] = []
    bar, task = progress_bar(progress, count, f"profiling {label}")
    with bar:
        for _ in range(count):
            start = time.perf_counter()
            try:
                session.run(None, feeds)
            except Exception as error:
                text = str(error).strip().splitlines()
                raise WpkError(f"{label}: run failed: "
                               f"{text[0][:200] if text else type(error).__name__}") from None
            walls.append((time.perf_counter() - start) * 1000.0)
            bar.advance(task)
    return walls


def _node_times(graph: Graph, optimized: onnx.ModelProto | None,
                trace: list[dict[str, Any]], walls: list[float], runs: int
                ) -> tuple[np.ndarray, float, dict[str, Any]]:
    """(per-node median ms, the whole-model median, the attribution's stats) from the
    profiler's `trace` and the measured runs' wall times."""
    per_run = kernel_times_per_run(trace, runs)
    kernel_median = {k: float(np.median([run.get(k, 0.0) for run in per_run]))
                     for k in {k for run in per_run for k in run}}
    kernel_map = build_kernel_map(graph, optimized, kernel_median)
    node_runs = []
    for wall, kernels in zip(walls, per_run):
        overhead = max(wall - sum(kernels.values()), 0.0) / max(len(kernels), 1)
        node_runs.append(kernel_map.attribute({k: ms + overhead for k, ms in kernels.items()}))
    node_ms = np.median(np.array(node_runs), axis=0)
    # Per-node medians drop each run's stray slow kernel; the typical run has one. Scale so
    # the nodes add up to the whole-model median (the factor is recorded).
    total_median = float(np.median(walls))
    raw_sum = float(node_ms.sum())
    scale = total_median / raw_sum if raw_sum > 0 else 1.0
    node_ms = node_ms * scale
    stats = dict(kernel_map.stats, scale=round(scale, 4))
    return node_ms, total_median, stats
