"""Where a custom-ops candidate's end-to-end gain comes from.

Per-operator selection times each kernel against the ONNX Runtime nodes it replaces, in its
place in the whole slice. Those savings, added up, are not what the slice saves end to end,
for two reasons measured here:

- the candidate starts from the "offline" candidate (wpk's graph passes, the searched session
  settings, ONNX Runtime's own saved graph), whose gain over ONNX Runtime's defaults is part
  of the end-to-end figure but no kernel's;
- replacing nodes changes more than their own node times: the nodes that stay can run faster
  or slower beside them (caches, the thread pool), and a run spends time outside node kernels
  (allocating each node's outputs, handing work to the pool, the executor's bookkeeping),
  which fewer, fused nodes reduce.

`in_place` profiles the saved graph with and without the kernels and splits
the difference into those parts, and times the two without the profiler too: ONNX Runtime's
profiler costs every node time, so where the kernels remove nodes the profile shows them
saving more than they do (MobileNetV2, 25 nodes fewer: 1.87 ms a run profiled, 0.68 not)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from wpk.optimizer.measure import DECIDE_SETTLE_S, compare_ratio
from wpk.optimizer.session import make_session, profile_each
from wpk.optimizer.space import Config

PROFILE_RUNS = 40
UNPROFILED_ROUNDS = 5
# the split is for the report only: with less of the time budget left it is skipped
MIN_SECONDS_LEFT = 30.0


def in_place_or_why_not(offline: onnx.ModelProto, rewritten: onnx.ModelProto, config: Config,
                        feed: dict[str, np.ndarray], output_names: list[str], library: Path,
                        seconds_left: float | None) -> dict[str, Any]:
    """`in_place`, or {"skipped": why} where the budget is nearly spent or it failed: the
    report's explanation must never cost the user their optimized slice."""
    if seconds_left is not None and seconds_left < MIN_SECONDS_LEFT:
        return {"skipped": f"{seconds_left:.0f} s of the time budget left"}
    try:
        return in_place(offline, rewritten, config, feed, output_names, library)
    except Exception as error:  # anything ORT raises: reported, never fatal
        return {"skipped": f"{type(error).__name__}: {error}"[:200]}


def in_place(offline: onnx.ModelProto, rewritten: onnx.ModelProto, config: Config,
             feed: dict[str, np.ndarray], output_names: list[str], library: Path,
             runs: int = PROFILE_RUNS) -> dict[str, Any]:
    """What the kernels save per run, in ms, split by ONNX Runtime's profiler: `replaced_ms`
    (the replaced nodes' time less the kernels'; the kernels are the nodes only `rewritten`
    has), `other_nodes_ms` (the nodes both graphs have), `outside_nodes_ms` (time outside
    node kernels) and `run_ms`, their sum: the whole run with and without the kernels; how
    many nodes each side has that the other has not; and `unprofiled_ms`, what the kernels
    save per run timed without the profiler (interleaved rounds). With parallel execution
    nodes overlap, so the split by nodes means nothing: only `run_ms` and `unprofiled_ms`."""
    models = [(offline.SerializeToString(), None),
              (rewritten.SerializeToString(), str(library))]
    plain, ours = profile_each(models, config, feed, output_names, runs)
    sessions = [make_session(model, config, True, custom_ops=ops) for model, ops in models]
    ratio = compare_ratio(*(lambda s=s: s.run(output_names, feed) for s in sessions),
                          rounds=UNPROFILED_ROUNDS, settle_s=DECIDE_SETTLE_S)
    del sessions
    counts = {"runs": runs, "unprofiled_ms": ratio.baseline_ms - ratio.candidate_ms,
              "run_ms": (plain.run_us - ours.run_us) / 1000.0}
    if config.get("execution_mode") == "parallel":
        return {**counts, "parallel": True}
    shared = plain.nodes.keys() & ours.nodes.keys()
    replaced = sum(t for name, t in plain.nodes.items() if name not in shared)
    kernels = sum(t for name, t in ours.nodes.items() if name not in shared)
    others = sum(plain.nodes[name] - ours.nodes[name] for name in shared)
    return {**counts, "replaced_ms": (replaced - kernels) / 1000.0,
            "other_nodes_ms": others / 1000.0,
            "outside_nodes_ms": (plain.outside_nodes_us - ours.outside_nodes_us) / 1000.0,
            "replaced_nodes": len(plain.nodes.keys() - shared),
            "kernel_nodes": len(ours.nodes.keys() - shared)}


def explain(key: str, candidate: dict[str, Any]) -> str:
    """The report's paragraph for one custom-ops candidate (its entry, as the report holds
    it: operator gains, end-to-end gain, the offline share under "offline_gain_ms" and
    `in_place` under "in_place")."""
    offline_gain_ms = candidate.get("offline_gain_ms")
    text = (f"{key}: its {candidate['kernels']} kernel(s) saved "
            f"{candidate['operator_gains_ms']:.3f} ms together when timed one by one; "
            f"end to end it saves {candidate['end_to_end_gain_ms']:.3f} ms.")
    if offline_gain_ms is not None:
        text += (f" Of that, {offline_gain_ms:.3f} ms is the offline candidate's (wpk's graph "
                 f"passes, the session settings and ONNX Runtime's saved graph, no kernel), "
                 f"{candidate['end_to_end_gain_ms'] - offline_gain_ms:.3f} ms the kernels'.")
    split = candidate.get("in_place") or {}
    if "skipped" in split:
        return text + f" (Not split: {split['skipped']}.)"
    if "replaced_ms" in split:
        text += (f" Profiled in place ({split['runs']} runs of the saved graph with and "
                 f"without them, one after the other), the kernels save "
                 f"{split['run_ms']:.3f} ms a run: "
                 f"{split['replaced_ms']:.3f} ms in the nodes they replace, "
                 f"{split['other_nodes_ms']:.3f} ms in the nodes that stay, and "
                 f"{split['outside_nodes_ms']:.3f} ms outside node kernels (output "
                 f"allocations, the thread pool's hand-offs, fewer nodes to schedule).")
    elif split:
        text += (f" Profiled (parallel execution: nodes overlap, no split by node), the "
                 f"kernels save {split['run_ms']:.3f} ms a run.")
    if split:
        fewer = split.get("replaced_nodes", 0) - split.get("kernel_nodes", 0)
        overstated = split["run_ms"] > split["unprofiled_ms"] and fewer > 0
        text += (f" Without the profiler they save {split['unprofiled_ms']:.3f} ms a run"
                 + (f": the profiler's own cost per node fell on {fewer} nodes fewer."
                    if overstated else "."))
    return text
