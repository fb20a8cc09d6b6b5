"""Cost model: how long every node takes on every tier.

Two sources behind one interface (`TierCosts`: one time per node, plus where it came from):
- **estimated**: a roofline on the tier's numbers, max(FLOPs / compute, bytes / bandwidth)
  plus a per-operator overhead, where the fraction of peak that real kernels reach per
  operator class comes from a micro-benchmark on this machine (`calibrate`).
- **measured**: per-node times of a profile (ONNX Runtime's profiler on the tier's machine,
  see `wpk.profiling`), used as they are.

Transfers are priced by `LinkSpec`: bytes / bandwidth, plus RTT / 2 per link crossed.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from wpk import settings
from wpk.graph import Graph, NodeInfo, conv_weight_index
from wpk.hostinfo import machine_facts
from wpk.tiers import TierSpec

# Fraction of the roofline (max(FLOPs / peak, bytes / bandwidth)) that ONNX Runtime kernels
# reach, per operator class. Used when no calibration is available.
DEFAULT_EFFICIENCY: dict[str, float] = {
    "conv": 0.5, "depthwise": 0.15, "gemm": 0.5, "memory": 0.5,
}


@dataclass(frozen=True)
class Efficiency:
    """Per-operator-class efficiencies; `source` says whether they were measured here."""

    factors: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_EFFICIENCY))
    source: str = "defaults"

    def __getitem__(self, key: str) -> float:
        return self.factors.get(key, DEFAULT_EFFICIENCY[key])


def op_class(node: NodeInfo, graph: Graph) -> str:
    """Which efficiency applies: conv, depthwise, gemm, or memory-bound."""
    if node.op_type in ("Conv", "ConvTranspose", "QLinearConv", "ConvInteger"):
        weight = graph.tensors[node.inputs[conv_weight_index(node.op_type)]]
        data = graph.tensors[node.inputs[0]]
        groups = data.shape[1] // max(weight.shape[1], 1) if len(data.shape) > 1 else 1
        return "depthwise" if groups > 1 and weight.shape[1] == 1 else "conv"
    if node.op_type in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        return "gemm"
    return "memory"


def roofline_ms(graph: Graph, tier: TierSpec, efficiency: Efficiency,
                nodes: Sequence[NodeInfo] | None = None) -> np.ndarray:
    """Estimated time (ms) of every node of `graph` on `tier` (of `nodes`, the graph's nodes
    with other FLOPs and bytes, e.g. at a batch of requests: `wpk.partitioner.batch`)."""
    times = np.empty(len(graph.nodes))
    peak_flops = tier.peak_gflops * 1e9
    peak_bytes = tier.mem_bandwidth_gbps * 1e9
    for node in graph.nodes if nodes is None else nodes:
        bound_s = max(node.flops / peak_flops, node.bytes_touched / peak_bytes)
        times[node.index] = (bound_s / efficiency[op_class(node, graph)] * 1e3
                             + tier.op_overhead_us * 1e-3)
    return times


@dataclass(frozen=True)
class TierCosts:
    """Per-node times (ms, aligned with graph.nodes) of one tier, and their origin."""

    tier: str
    node_ms: np.ndarray
    source: str                    # "estimated", "measured (<profile name>)"
    machine: str | None = None     # candidate machine name, when chosen among several
    profile: dict | None = None    # {"name", "sha256", "file"} when measured
    batch: int | None = 1          # requests per run that node_ms were timed at (None: unknown)
    # with dynamic batching (the partitioner sets it): per request, when the tier runs
    # batches of the plan's max batch; node_ms is then a lone request's time
    batched_ms: np.ndarray | None = None


def estimated_costs(graph: Graph, tier: TierSpec, efficiency: Efficiency) -> TierCosts:
    return TierCosts(tier.name, roofline_ms(graph, tier, efficiency),
                     f"estimated ({tier.hardware}, {efficiency.source})")


# -- calibration on this machine ---------------------------------------------------------
CALIBRATION_VERSION = 1


def _cache_path() -> Path:
    return settings.cache_dir() / "calibration.json"


def _machine_key() -> str:
    """The calibration cache's key for this machine (see `wpk.hostinfo.MachineFacts`)."""
    return machine_facts().calibration_key()


def _best_time(run, repeats: int = 7) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_efficiency() -> Efficiency:
    """Micro-benchmark: what fraction of the roofline ONNX Runtime kernels reach here.

    This machine's peak compute is a large numpy matmul (BLAS, per core) and its bandwidth a
    large numpy copy; each operator class's efficiency is the roofline time of a
    representative layer (at those peaks) divided by ORT's measured time on one thread.
    Dividing another tier's roofline by the same fractions is the estimate for that tier.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 1024), dtype=np.float32)
    core_flops = 2 * 1024 ** 3 / _best_time(lambda: a @ a, 5) / max(os.cpu_count() or 1, 1)
    big = rng.standard_normal(32 * 1024 * 1024 // 4, dtype=np.float32)
    out = np.empty_like(big)
    peak_bytes = 2 * big.nbytes / _best_time(lambda: np.copyto(out, big), 5)

    def efficiency_of(node, feeds, weights, flops: float) -> float:
        graph = helper.make_graph(
            [node], "calibration",
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in feeds.items()],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(v, k) for k, v in weights.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        measured = _best_time(lambda: session.run(None, feeds))
        output_bytes = session.run(None, feeds)[0].nbytes
        moved = sum(v.nbytes for v in feeds.values()) + sum(
            v.nbytes for v in weights.values()) + output_bytes
        roofline = max(flops / core_flops, moved / peak_bytes)
        return min(1.0, max(0.02, roofline / measured))

    x = rng.standard_normal((1, 64, 56, 56), dtype=np.float32)
    big_x = rng.standard_normal((1, 64, 224, 224), dtype=np.float32)
    factors = {
        "conv": efficiency_of(helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
                              {"x": x}, {"w": rng.standard_normal((64, 64, 3, 3), np.float32)},
                              2 * 64 * 56 * 56 * 64 * 9),
        "depthwise": efficiency_of(
            helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=64),
            {"x": x}, {"w": rng.standard_normal((64, 1, 3, 3), np.float32)}, 2 * 64 * 56 * 56 * 9),
        "gemm": efficiency_of(helper.make_node("Gemm", ["x", "w"], ["y"], transB=1),
                              {"x": rng.standard_normal((1, 1024), np.float32)},
                              {"w": rng.standard_normal((1024, 1024), np.float32)}, 2 * 1024 ** 2),
        "memory": efficiency_of(helper.make_node("Relu", ["x"], ["y"]), {"x": big_x}, {},
                                big_x.size),
    }
    return Efficiency({k: round(v, 4) for k, v in factors.items()}, "calibrated")


def calibrate(use_cache: bool = True) -> Efficiency:
    """Efficiency factors for this machine, measured once and cached in ~/.cache/wpk."""
    path = _cache_path()
    key = _machine_key()
    if use_cache and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("version") == CALIBRATION_VERSION and data.get("machine") == key:
                return Efficiency(data["factors"], "calibrated")
        except (ValueError, KeyError, TypeError):
            pass
    efficiency = measure_efficiency()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": CALIBRATION_VERSION, "machine": key,
                                    "factors": dict(efficiency.factors)}, indent=2))
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return efficiency


def measured_costs(tier: str, node_ms: Sequence[float], source: str,
                   machine: str | None = None, profile: dict | None = None,
                   batch: int | None = 1) -> TierCosts:
    """Given times of one run at `batch` requests (a lone request by default)."""
    return TierCosts(tier, np.asarray(node_ms, dtype=float), source, machine, profile, batch)
