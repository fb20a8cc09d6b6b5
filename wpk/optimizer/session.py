"""ONNX Runtime as a candidate implementation: providers that really run here, and the
session-level configuration space (threads, execution mode, graph optimization level)."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from wpk.optimizer.passes import LEVELS
from wpk.optimizer.space import Config, Knob, Space

DEFAULT_SESSION: Config = {"provider": "CPUExecutionProvider", "threads": 0,
                           "execution_mode": "sequential", "graph_level": "all"}


@functools.lru_cache(maxsize=1)
def working_providers() -> tuple[str, ...]:
    """Providers a session really runs on. onnxruntime-gpu lists CUDA and TensorRT even
    without a GPU and silently falls back to CPU, so each one is tried on a tiny model."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    found = []
    for provider in ort.get_available_providers():
        if provider in ("AzureExecutionProvider",):
            continue
        try:
            session = ort.InferenceSession(model.SerializeToString(), providers=[provider])
        except Exception:
            continue
        if session.get_providers()[0] == provider:
            found.append(provider)
    return tuple(found) or ("CPUExecutionProvider",)


def session_space(cores: int | None = None, levels: tuple[str, ...] = ("all", "extended",
                                                                       "basic")) -> Space:
    cores = cores or os.cpu_count() or 1
    threads = tuple(dict.fromkeys([0] + list(range(1, cores + 1))))
    return Space([Knob("provider", working_providers()), Knob("threads", threads),
                  Knob("execution_mode", ("sequential", "parallel")),
                  Knob("graph_level", levels)])


def session_options(config: Config, offline_optimized: bool = False,
                    spinning: bool = True, custom_ops: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if custom_ops:  # our generated kernels as ONNX Runtime operators (wpk.optimizer.ort_ops)
        options.register_custom_ops_library(custom_ops)
    if not spinning:
        # inside a segment executor: spin while a run lasts (ops follow each other closely)
        # but stop at its end, so the generated kernels' threads get the cores in between;
        # with spinning off, every op pays a thread wake-up (measured slower)
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.intra_op_num_threads = int(config.get("threads", 0))
    options.execution_mode = (ort.ExecutionMode.ORT_PARALLEL
                              if config.get("execution_mode") == "parallel"
                              else ort.ExecutionMode.ORT_SEQUENTIAL)
    level = "disabled" if offline_optimized else config.get("graph_level", "all")
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    return options


def providers_for(config: Config) -> list[Any]:
    provider = config.get("provider", "CPUExecutionProvider")
    return [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])


def make_session(model: bytes | str, config: Config, offline_optimized: bool = False,
                 spinning: bool = True, custom_ops: str | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(model, session_options(config, offline_optimized, spinning,
                                                       custom_ops),
                                providers=providers_for(config))


@dataclass
class NodeProfile:
    """One session's profile: each node's median time per run and the median run, in µs.
    `run_us` less the nodes' sum is what a run spends outside node kernels (allocating
    outputs, handing work to the thread pool, the executor's own bookkeeping)."""

    nodes: dict[str, float]
    run_us: float

    @property
    def outside_nodes_us(self) -> float:
        return self.run_us - sum(self.nodes.values())


def profile_each(models: list[tuple[bytes, str | None]], config: Config,
                 feed: dict[str, Any], output_names: list[str], runs: int = 30,
                 offline_optimized: bool = True) -> list[NodeProfile]:
    """ONNX Runtime's profile of each (model, custom-ops library or None), one session at a
    time. Not run by run in turn: a session's pool threads spin on after its run and take
    the cores from the other session's next run (all-MiniLM-L6-v2: the kernels' summed
    per-node gains came out at 7.67 ms that way, 3.92 ms one session at a time, where the
    slice saved 6.48 and 6.35 ms end to end)."""
    return [_profile_one(model, custom_ops, config, feed, output_names, runs,
                         offline_optimized) for model, custom_ops in models]


def _profile_one(model: bytes, custom_ops: str | None, config: Config, feed: dict[str, Any],
                 output_names: list[str], runs: int, offline_optimized: bool) -> NodeProfile:
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="wpk-profile-") as directory:
        options = session_options(config, offline_optimized, True, custom_ops)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(directory) / "nodes")
        session = ort.InferenceSession(model, options, providers=providers_for(config))
        for _ in range(runs):
            session.run(output_names, feed)
        return _profile(json.loads(Path(session.end_profiling()).read_text()))


def _profile(events: list[dict[str, Any]]) -> NodeProfile:
    from collections import defaultdict

    import numpy as np

    durations: dict[str, list[float]] = defaultdict(list)
    runs: list[float] = []
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            durations[name.removesuffix("_kernel_time")].append(float(event["dur"]))
        elif event.get("cat") == "Session" and name == "model_run":
            runs.append(float(event["dur"]))
    # the first profiled run includes one-time allocations: medians ignore it
    return NodeProfile({name: float(np.median(times)) for name, times in durations.items()},
                       float(np.median(runs)) if runs else float("nan"))
