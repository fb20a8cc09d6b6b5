"""Cut a model into a plan directory at given node positions (a stand-in for wpk-partition
in runtime tests: same plan.json format, slices cut with onnx.utils.Extractor)."""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from wpk.naming import name_nodes
from wpk.plan import LinkPlan, Plan, TierPlan

TIER_NAMES = ("device", "edge", "cloud")


def _tensor_types(model: onnx.ModelProto) -> dict[str, dict]:
    graph = model.graph
    specs = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = info.type.tensor_type
        if not t.HasField("shape"):
            continue
        specs[info.name] = {"name": info.name,
                            "shape": [d.dim_value if d.HasField("dim_value") else -1
                                      for d in t.shape.dim],
                            "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name}
    return specs


def make_plan(model: onnx.ModelProto, directory: Path, cuts: list[int],
              codecs: list[str] | None = None, name: str | None = None) -> Plan:
    """Tier k runs nodes [cuts[k-1], cuts[k]); len(cuts)+1 tiers. Writes plan.json + slices."""
    model = onnx.shape_inference.infer_shapes(model)
    name_nodes(model)
    directory.mkdir(parents=True, exist_ok=True)
    nodes = list(model.graph.node)
    bounds = [0] + list(cuts) + [len(nodes)]
    tier_of_node = {}
    for k in range(len(bounds) - 1):
        for node in nodes[bounds[k]:bounds[k + 1]]:
            tier_of_node[node.name] = k
    n_tiers = len(bounds) - 1
    initializers = {i.name for i in model.graph.initializer}
    model_inputs = [i.name for i in model.graph.input if i.name not in initializers]
    model_outputs = [o.name for o in model.graph.output]
    produced_at = {t: -1 for t in model_inputs}
    consumers: dict[str, set[int]] = {}
    for node in nodes:
        for out in node.output:
            produced_at[out] = tier_of_node[node.name]
        for inp in node.input:
            if inp and inp not in initializers:
                consumers.setdefault(inp, set()).add(tier_of_node[node.name])
    types = _tensor_types(model)
    tiers, tensors = [], {}
    for t in model_inputs + model_outputs:
        tensors[t] = types[t]
    for k in range(n_tiers):
        tier_name = TIER_NAMES[k] if n_tiers <= 3 else f"tier{k}"
        order = list(produced_at)
        inputs = [t for t in order if produced_at[t] < k and
                  any(c >= k for c in consumers.get(t, ()))]
        forward = [t for t in order if produced_at[t] <= k and
                   any(c > k for c in consumers.get(t, ()))]
        slice_inputs = [t for t in inputs if k in consumers.get(t, ())]
        passthrough = [t for t in inputs if t in forward and t not in slice_inputs]
        slice_outputs = [t for t in order if produced_at[t] == k and
                         (any(c > k for c in consumers.get(t, ())) or t in model_outputs)]
        results = [t for t in model_outputs if produced_at[t] == k]
        for t in forward:
            tensors[t] = types[t]
        slice_file = f"{tier_name}.onnx"
        extracted = onnx.utils.Extractor(model).extract_model(slice_inputs, slice_outputs)
        onnx.save(extracted, str(directory / slice_file))
        tiers.append(TierPlan(
            name=tier_name, slice=slice_file,
            nodes=[n.name for n in nodes[bounds[k]:bounds[k + 1]]],
            inputs=inputs, outputs=forward + results, slice_inputs=slice_inputs,
            slice_outputs=slice_outputs, forward=forward, results=results,
            passthrough=passthrough, predicted_compute_ms=1.0))
    links = []
    for k in range(n_tiers - 1):
        forward = tiers[k].forward
        links.append(LinkPlan(
            src=tiers[k].name, dst=tiers[k + 1].name, bandwidth_mbps=100.0, rtt_ms=1.0,
            tensors=forward, bytes=0, return_tensors=[], return_bytes=0,
            predicted_transfer_ms=0.0, codec=(codecs or ["raw"] * n_tiers)[k]))
    plan = Plan(
        model={"name": name or model.graph.name, "file": "model.onnx", "sha256": "",
               "inputs": [types[t] for t in model_inputs],
               "outputs": [types[t] for t in model_outputs]},
        objective={"name": "latency", "privacy": None, "deliver_to": tiers[0].name,
                   "max_latency_ms": None},
        tiers=tiers, links=links, predicted={}, tensors=tensors)
    plan.save(directory)
    onnx.save(model, str(directory / "model.onnx"))
    return plan
