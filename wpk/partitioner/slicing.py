"""Cut a model into one ONNX slice per tier, and check that the chained slices match it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from wpk.errors import WpkError, ort_error_line
from wpk.feeds import random_feeds
from wpk.graph import Graph
from wpk.ort_session import cpu_session
from wpk.subgraphs import node_reads


@dataclass
class TierSlice:
    """What one tier does: its nodes and the tensors around them (see wpk/plan.py)."""

    tier: int
    nodes: list[int]
    inputs: list[str]
    forward: list[str]
    results: list[str]
    slice_inputs: list[str]
    slice_outputs: list[str]

    @property
    def outputs(self) -> list[str]:
        return list(dict.fromkeys(self.forward + self.results))

    @property
    def passthrough(self) -> list[str]:
        outputs = set(self.outputs)
        return [t for t in self.inputs if t in outputs]


def tier_slices(graph: Graph, tiers: np.ndarray, forward_tensors: Sequence[Sequence[str]],
                deliver_to: int, relays: Sequence[int] = ()) -> list[TierSlice]:
    """Slices for the used tiers: those with nodes, the first tier (where the model inputs
    are), the tier the results go to, and `relays` where data passes through them. Other
    tiers in between are passed through.

    `forward_tensors[k]` are the tensors crossing link k (tiers k -> k+1), as priced.
    """
    used = set(int(t) for t in tiers) | {0, deliver_to}
    used = sorted(used | {t for t in relays if min(used) < t < max(used)})
    source_tier = {t: 0 for t in graph.inputs}
    for node in graph.nodes:
        for out in node.outputs:
            source_tier[out] = int(tiers[node.index])
    slices = []
    for position, t in enumerate(used):
        forward = list(forward_tensors[t]) if position < len(used) - 1 else []
        results = [o for o in graph.outputs
                   if (source_tier[o] == t and t >= deliver_to)
                   or (source_tier[o] < deliver_to and t == deliver_to)]
        slices.append(_tier_slice(graph, tiers, t, forward_tensors, forward, results))
    return slices


def _tier_slice(graph: Graph, tiers: np.ndarray, t: int,
                forward_tensors: Sequence[Sequence[str]], forward: list[str],
                results: list[str]) -> TierSlice:
    """Tier t's slice, given what it sends on (`forward`) and the `results` it gives."""
    nodes = [v for v in range(len(graph.nodes)) if tiers[v] == t]
    if t == 0:
        inputs = [name for name in graph.inputs if name in graph.consumers
                  or name in graph.outputs]
    else:
        inputs = list(forward_tensors[t - 1])
    produced = {out for v in nodes for out in graph.nodes[v].outputs}
    consumed = {i for v in nodes for i in graph.nodes[v].inputs}
    slice_inputs = [name for name in inputs if name in consumed]
    slice_outputs = [name for name in dict.fromkeys(forward + results) if name in produced]
    return TierSlice(t, nodes, inputs, forward, results, slice_inputs, slice_outputs)


def slice_model(graph: Graph, piece: TierSlice, name: str) -> onnx.ModelProto:
    """The ONNX model of one tier: its nodes, the weights they read, typed inputs/outputs."""
    source = graph.model
    by_name = {node.name: node for node in source.graph.node}
    nodes = [by_name[graph.nodes[v].name] for v in piece.nodes]
    used = {i for node in nodes for i in node_reads(node)}
    initializers = [init for init in source.graph.initializer if init.name in used]
    value_infos = {v.name: v for v in list(source.graph.input) + list(source.graph.value_info)
                   + list(source.graph.output)}

    def typed(tensor: str) -> onnx.ValueInfoProto:
        info = graph.tensors[tensor]
        return helper.make_tensor_value_info(
            tensor, helper.np_dtype_to_tensor_dtype(info.dtype), list(info.shape))

    internal = ({o for node in nodes for o in node.output} - set(piece.slice_outputs))
    body = helper.make_graph(
        nodes, f"{graph.name}.{name}", [typed(t) for t in piece.slice_inputs],
        [typed(t) for t in piece.slice_outputs], initializers,
        value_info=[value_infos[t] for t in sorted(internal) if t in value_infos])
    model = helper.make_model(body, opset_imports=list(source.opset_import),
                              producer_name="wpk-partition")
    model.ir_version = source.ir_version
    model.functions.extend(source.functions)
    return model


# -- verification --------------------------------------------------------------------------
def random_inputs(graph: Graph, seed: int) -> dict[str, np.ndarray]:
    """Model inputs drawn at random (normal floats, integers and booleans of 0 or 1)."""
    return random_feeds({name: (graph.tensors[name].shape, graph.tensors[name].dtype)
                         for name in graph.inputs}, seed, integer_values=2)


def _session(model: onnx.ModelProto):
    return cpu_session(model, lambda line: f"plan check: ONNX Runtime cannot run "
                       f"{model.graph.name!r}: {line} (--no-verify skips the check)")


def run_chain(models: Sequence[onnx.ModelProto | None], pieces: Sequence[TierSlice],
              feeds: Mapping[str, np.ndarray], sessions: list | None = None
              ) -> dict[str, np.ndarray]:
    """Run the slices in flow order as the runtime does; returns every result tensor."""
    sessions = sessions or [None if m is None else _session(m) for m in models]
    arriving = dict(feeds)
    results: dict[str, np.ndarray] = {}
    for session, piece in zip(sessions, pieces):
        values = {name: arriving[name] for name in piece.inputs}
        if session is not None and piece.slice_outputs:
            outs = session.run(piece.slice_outputs, {n: values[n] for n in piece.slice_inputs})
            values.update(zip(piece.slice_outputs, outs))
        results.update({name: values[name] for name in piece.results})
        arriving = {name: values[name] for name in piece.forward}
    return results


def verify(graph: Graph, models: Sequence[onnx.ModelProto | None], pieces: Sequence[TierSlice],
           samples: int = 2, rtol: float = 1e-3, atol: float = 1e-4) -> dict:
    """Chained slices vs. the whole model on random inputs; raises WpkError on a mismatch."""
    whole = _session(graph.model)
    sessions = [None if m is None else _session(m) for m in models]
    worst = 0.0
    for seed in range(samples):
        feeds = random_inputs(graph, seed)
        try:
            expected = dict(zip(graph.outputs, whole.run(graph.outputs, feeds)))
            got = run_chain(models, pieces, feeds, sessions)
        except Exception as error:  # ORT's own exception types
            raise WpkError(f"plan check: ONNX Runtime failed on random inputs: "
                           f"{ort_error_line(error)} (--no-verify skips the check)") from None
        for name in graph.outputs:
            if name not in got:
                raise WpkError(f"plan check failed: output {name!r} is not produced by any tier")
            if got[name].shape != expected[name].shape:
                raise WpkError(f"plan check failed: output {name!r} has shape "
                               f"{got[name].shape}, expected {expected[name].shape}")
            # NaN where the whole model gives NaN too is the same answer
            diff = np.nan_to_num(np.abs(got[name].astype(np.float64)
                                        - expected[name].astype(np.float64)), nan=0.0)
            worst = max(worst, float(diff.max(initial=0.0)))
            if not np.allclose(got[name], expected[name], rtol=rtol, atol=atol,
                               equal_nan=True):
                raise WpkError(f"plan check failed: output {name!r} differs from the whole "
                               f"model by up to {float(diff.max()):.3g} (rtol={rtol}, atol={atol})")
    return {"samples": samples, "max_abs_error": worst, "rtol": rtol, "atol": atol,
            "passed": True}


def save_slices(directory: Path, models: Sequence[onnx.ModelProto | None],
                names: Sequence[str]) -> list[str | None]:
    files: list[str | None] = []
    for model, name in zip(models, names):
        if model is None:
            files.append(None)
            continue
        filename = f"{name}.onnx"
        onnx.save(model, str(directory / filename))
        files.append(filename)
    return files
