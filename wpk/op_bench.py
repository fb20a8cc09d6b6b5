"""Time the operator grid on this machine: the measurement behind `wpk-profile --ops`.

Each case of `wpk.op_grid` runs alone in an ONNX Runtime session set up as `wpk-profile`
sets one up (provider, intra-op threads, graph optimizations, sequential execution, the
profiler on). What a case costs inside a model is its *kernel* time from ORT's profiler:
the layout reorders ORT puts around a lone NCHWc convolution (ReorderInput/ReorderOutput)
are recorded apart (family `reorder`), and the session's fixed costs are left out, because
inside a network the tensors mostly stay in that layout and a run pays its fixed cost once.
Those costs are measured apart, on chains of 1 and 17 tiny nodes, as `overhead_ms.run`
(per session run) and `overhead_ms.node` (per kernel, beyond its own time).

Before each timed run the caches are set as a layer inside a network finds them (a large
layer's weights pushed out, the input just written). The grid is timed in `rounds` interleaved passes and each
case keeps its lowest median; three of wpk's example networks then give the in-network
scale (`wpk.op_calibrate`).

With a GPU provider the profiler sees only kernel launches, so a case's time is its wall
time less the run overhead.
"""
from __future__ import annotations

import datetime as dt
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from wpk.errors import WpkError, ort_error_line
from wpk.feeds import random_feeds
from wpk.graph import Graph
from wpk.hostinfo import host_info, physical_cores
from wpk.op_calibrate import calibration_networks, network_scale
from wpk.op_features import node_features
from wpk.op_grid import OpCase, grid
from wpk.op_table import TABLE_VERSION
from wpk.profiling import (OPTIMIZATION_LEVELS, kernel_times_per_run, progress_bar,
                           resolve_provider)

# Kernels ORT adds around a lone operator that a network would not run for it.
LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput", "MemcpyToHost", "MemcpyFromHost"})
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 3
DEFAULT_ROUNDS = 3
CASE_BUDGET_S = 0.25        # timed runs stop after this long (at least MIN_RUNS)
MIN_RUNS = 5
FLUSH_LIMIT = 512 * 1024 * 1024


def core_cache_bytes() -> int:
    """The largest cache a core has to itself (L2; 2 MB if the system does not say)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            level = int((index / "level").read_text())
        except (OSError, ValueError):
            continue
        if level == 2 and text.endswith("K"):
            sizes.append(int(text[:-1]) * 1024)
    return max(sizes, default=2 * 1024 * 1024)


class _Timer:
    """Sessions for single-operator models, all set up alike."""

    def __init__(self, provider: str, threads: int, optimization: str, workdir: Path,
                 runs: int, warmup: int):
        self.provider, self.threads, self.optimization = provider, threads, optimization
        self.workdir, self.runs, self.warmup = workdir, runs, warmup
        self.count = 0
        self.flush = np.zeros(0, np.float32)

    def _as_in_a_network(self, feeds: dict[str, np.ndarray], nbytes: int) -> None:
        """Caches as a layer inside a network finds them: a layer larger than the core's
        own cache finds its weights pushed out by the layers before it (twice its bytes
        are written over); a smaller one, like its neighbours, stays in the caches
        (nothing is written over: flushing would charge it for code and page tables a
        network keeps warm). Either finds its input just written by the layer before."""
        if nbytes > core_cache_bytes():
            size = min(2 * nbytes, FLUSH_LIMIT) // 4
            if len(self.flush) < size:
                self.flush = np.zeros(size, np.float32)
            self.flush[:size] += 1.0
        for array in feeds.values():
            array.sum()

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        self.count += 1
        options.profile_file_prefix = str(self.workdir / f"case{self.count}")
        options.log_severity_level = 4
        providers = [self.provider] if self.provider == "CPUExecutionProvider" \
            else [self.provider, "CPUExecutionProvider"]
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)

    def time(self, model: onnx.ModelProto, label: str, nbytes: int = 0) -> "_Timing":
        """The medians of one model's kernels, layout reorders and wall time."""
        try:
            session = self._session(model)
        except Exception as error:
            raise WpkError(f"{label}: onnxruntime cannot load it with {self.provider}: "
                           f"{ort_error_line(error)}") from None
        feeds = random_feeds({i.name: ([d.dim_value for d in i.type.tensor_type.shape.dim],
                                       np.float32) for i in model.graph.input}, seed=0)
        for _ in range(self.warmup):
            session.run(None, feeds)
        walls: list[float] = []
        started = time.perf_counter()
        while len(walls) < self.runs and (len(walls) < MIN_RUNS or
                                          time.perf_counter() - started < CASE_BUDGET_S):
            self._as_in_a_network(feeds, nbytes)
            start = time.perf_counter()
            session.run(None, feeds)
            walls.append((time.perf_counter() - start) * 1000.0)
        trace_file = Path(session.end_profiling())
        trace = json.loads(trace_file.read_text())
        trace_file.unlink()
        per_run = kernel_times_per_run(trace, len(walls))
        reorders = {kind: float(np.median([sum(ms for k, ms in run.items() if k.startswith(kind))
                                           for run in per_run]))
                    for kind in LAYOUT_OPS}
        kernel = float(np.median([sum(ms for k, ms in run.items()
                                      if not k.startswith(tuple(LAYOUT_OPS)))
                                  for run in per_run]))
        return _Timing(kernel, float(np.median(walls)), len(walls),
                       {k: v for k, v in reorders.items() if v > 0})


@dataclass
class _Timing:
    kernel_ms: float
    wall_ms: float
    runs: int
    layout_ms: dict[str, float]      # ReorderInput / ReorderOutput kernels around it


def _relu_chain(length: int) -> onnx.ModelProto:
    names = ["x"] + [f"r{i}" for i in range(length - 1)] + ["y"]
    nodes = [helper.make_node("Relu", [a], [b]) for a, b in zip(names, names[1:])]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _overheads(timer: _Timer) -> dict[str, float]:
    """Per run and per kernel costs beyond the kernels' own time, from chains of tiny
    Relus (medians of three tries each: they are microseconds, easily disturbed)."""
    one, long = [], []
    for _ in range(3):
        timing = timer.time(_relu_chain(1), "overhead (1 node)")
        one.append((timing.kernel_ms, timing.wall_ms))
        timing = timer.time(_relu_chain(17), "overhead (17 nodes)")
        long.append((timing.kernel_ms, timing.wall_ms))
    k1, w1 = np.median(one, axis=0)
    k17, w17 = np.median(long, axis=0)
    node = max(((w17 - k17) - (w1 - k1)) / 16, 0.0)
    return {"run": round(float(max(w1 - k1 - node, 0.0)), 6), "node": round(float(node), 6)}


@dataclass(frozen=True)
class _Prepared:
    """A case as the table records it: what its node is, apart from its time."""

    case: OpCase
    family: str
    flops: float
    bytes: float
    tensor_bytes: dict[str, float]     # ReorderInput / ReorderOutput -> the tensor's bytes

    @classmethod
    def of(cls, case: OpCase) -> "_Prepared":
        graph = Graph.load(case.model(), name=case.name)
        node = graph.nodes[0]
        features = node_features(node, graph)
        return cls(case, features.family, features.flops, features.bytes,
                   {"ReorderInput": float(graph.tensor_bytes(node.inputs[0])),
                    "ReorderOutput": float(graph.tensor_bytes(node.outputs[0]))})


def _lowest(timings: list[_Timing]) -> _Timing:
    """Over rounds, the lowest median of each: other programs on the machine only ever
    slow a round down."""
    kinds = set.intersection(*(set(t.layout_ms) for t in timings))
    return _Timing(min(t.kernel_ms for t in timings), min(t.wall_ms for t in timings),
                   sum(t.runs for t in timings),
                   {k: min(t.layout_ms[k] for t in timings) for k in kinds})


def _entries(prepared: _Prepared, timing: _Timing, on_cpu: bool,
             run_overhead: float) -> list[dict[str, Any]]:
    """The case's entry, and one per layout reorder ORT ran around it (family `reorder`:
    its time against the bytes of the tensor it reordered)."""
    case = prepared.case
    ms = timing.kernel_ms if on_cpu else max(timing.wall_ms - run_overhead, 0.0)
    entries = [{"case": case.name, "op_type": case.op_type, "family": prepared.family,
                "flops": prepared.flops, "bytes": prepared.bytes,
                "ms": round(max(ms, 1e-6), 6), "wall_ms": round(timing.wall_ms, 6),
                "runs": timing.runs}]
    for kind, reorder_ms in sorted(timing.layout_ms.items()):
        if kind in prepared.tensor_bytes and on_cpu:
            entries.append({"case": f"{kind} of {case.name}", "op_type": kind,
                            "family": "reorder", "flops": 0.0,
                            "bytes": prepared.tensor_bytes[kind],
                            "ms": round(max(reorder_ms, 1e-6), 6), "runs": timing.runs})
    return entries


def nchwc_block(entries: list[dict[str, Any]]) -> int:
    """Channels per NCHWc block on this machine: 16 with AVX-512, 8 with AVX2, 0 where ORT
    ran no layout reorders (no NCHWc kernels)."""
    if not any(e["family"] == "reorder" for e in entries):
        return 0
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return 16 if " avx512f" in flags else 8


def time_operators(kind: str = "default", provider: str = "cpu", threads: int | None = None,
                   runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
                   name: str | None = None, progress: bool = True, optimization: str = "all",
                   cases: Sequence[OpCase] | None = None,
                   rounds: int = DEFAULT_ROUNDS,
                   between_rounds: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Time the `kind` grid (or `cases`) here, `rounds` times over; returns the table
    document (docs/op-tables.md). `between_rounds(r)` runs after pass r (a benchmark
    measures its models there, interleaved with the table's passes)."""
    if runs < 1 or warmup < 0 or rounds < 1:
        raise WpkError("--runs and --rounds must be at least 1 and --warmup at least 0")
    full_provider = resolve_provider(provider)
    threads = threads or physical_cores()
    cases_given = cases is not None
    prepared = [_Prepared.of(case) for case in (cases if cases_given else grid(kind))]
    on_cpu = full_provider == "CPUExecutionProvider"
    networks = calibration_networks()
    with tempfile.TemporaryDirectory(prefix="wpk-ops-") as tmp:
        timer = _Timer(full_provider, threads, optimization, Path(tmp), runs, warmup)
        overhead = _overheads(timer)
        timings: list[list[_Timing]] = [[] for _ in prepared]
        walls: dict[str, list[float]] = {name: [] for name in networks}
        bar, task = progress_bar(progress, rounds * len(prepared), "timing operators")
        with bar:
            for round_ in range(rounds):    # rounds interleaved: a busy minute hits each once
                for item, case_timings in zip(prepared, timings):
                    case_timings.append(timer.time(item.case.model(), item.case.name,
                                                   int(item.bytes)))
                    bar.advance(task)
                for label, model in networks.items():
                    walls[label].append(timer.time(model, label).wall_ms)
                if between_rounds is not None:
                    between_rounds(round_)
    entries = [entry for item, case_timings in zip(prepared, timings)
               for entry in _entries(item, _lowest(case_timings), on_cpu, overhead["run"])]
    document = _document(kind, cases_given, full_provider, threads, runs, warmup, name,
                         optimization, overhead, entries)
    document["rounds"] = rounds
    document["calibration"] = network_scale(document, lambda model, label: min(walls[label]))
    return document


def _document(kind: str, cases_given: bool, provider: str, threads: int, runs: int,
              warmup: int, name: str | None, optimization: str, overhead: dict[str, float],
              entries: list[dict[str, Any]]) -> dict[str, Any]:
    host = host_info()
    return {
        "version": TABLE_VERSION, "kind": "op-table",
        "device": {"name": name or host["hostname"] or "unnamed", "provider": provider,
                   "threads": threads, "host": host, "onnxruntime": ort.__version__},
        "grid": "custom" if cases_given else kind,
        "runs": runs, "warmup": warmup,
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "optimization": optimization,
        "overhead_ms": overhead,
        "layout": {"nchwc_block": nchwc_block(entries)},
        "entries": entries,
    }
