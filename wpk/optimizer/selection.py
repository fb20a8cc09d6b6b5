"""Per-operator selection: time ONNX Runtime and our tuned kernel on each heavy operator of a
slice, keep the faster, and cut the slice into segments for the segment executor."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from wpk.errors import WpkError
from wpk.optimizer import ops, winograd
from wpk.optimizer.kernels import KERNEL_OPS, BoundKernel, KernelSpec, spec_for_node
from wpk.optimizer.measure import compare_ms
from wpk.optimizer.search import Evaluator
from wpk.optimizer.space import Config
from wpk.optimizer.session import make_session

if TYPE_CHECKING:   # ort_ops imports this module: only for the annotation
    from wpk.optimizer.ort_ops import ConvOrigins


@dataclass
class OpChoice:
    node: str
    op: str
    signature: str
    ort_ms: float
    kernel_ms: float
    schedule: Config | None
    chosen: str                       # "ort" or "kernel"
    measured: int = 0
    reused: int = 0
    spec: KernelSpec | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "signature": self.signature,
                "ort_ms": self.ort_ms, "kernel_ms": self.kernel_ms, "schedule": self.schedule,
                "chosen": self.chosen, "measured": self.measured, "reused": self.reused}


def shapes_of(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static shapes of the model's float32 tensors. Our kernels compute in float32 alone: a
    node whose input is fp16 or int8 finds no shape here and is left to ONNX Runtime."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + \
            list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            continue
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


def heavy_specs(model: onnx.ModelProto, consts: dict[str, np.ndarray], limit: int
                ) -> list[KernelSpec]:
    """Kernel specs for the heaviest covered nodes (Conv/Gemm fused with a sole Relu)."""
    shapes = shapes_of(model)
    uses = Counter(n for node in model.graph.node for n in node.input)
    graph_outputs = {o.name for o in model.graph.output}
    consumer = {}
    for node in model.graph.node:
        for name in node.input:
            consumer.setdefault(name, node)
    specs = []
    for node in model.graph.node:
        if node.op_type not in KERNEL_OPS or node.domain not in ("", "ai.onnx"):
            continue
        relu_out = None
        nxt = consumer.get(node.output[0])
        if node.op_type in ("Conv", "Gemm", "MatMul") and nxt is not None and \
                nxt.op_type == "Relu" and uses[node.output[0]] == 1 and \
                node.output[0] not in graph_outputs:
            relu_out = nxt.output[0]
        spec = spec_for_node(node, shapes, consts, relu_out)
        if spec is not None:
            spec.node = node.name + (f"+{nxt.name}" if relu_out else "")
            specs.append(spec)
    specs.sort(key=lambda s: -s.compute().flops)
    return specs[:limit]


def node_model(model: onnx.ModelProto, spec: KernelSpec) -> onnx.ModelProto:
    """The nodes a spec replaces as a model of their own, for timing ORT on them alone."""
    names = set(spec.node.split("+"))
    nodes = [n for n in model.graph.node if n.name in names]
    shapes = shapes_of(model)
    consts = {i.name: i for i in model.graph.initializer}
    produced = {o for node in nodes for o in node.output}
    inputs = list(dict.fromkeys(n for node in nodes for n in node.input
                                if n and n not in consts and n not in produced))
    graph = helper.make_graph(
        nodes, "op", [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shapes[n])
                      for n in inputs],
        [helper.make_tensor_value_info(spec.output, onnx.TensorProto.FLOAT, None)],
        [consts[n] for node in nodes for n in node.input if n in consts])
    out = helper.make_model(graph, opset_imports=model.opset_import)
    out.ir_version = model.ir_version
    return out


def _random_feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {i.name: rng.random([d.dim_value for d in i.type.tensor_type.shape.dim],
                               dtype=np.float32) for i in model.graph.input}


def select_winograd(model: onnx.ModelProto, consts: dict[str, np.ndarray],
                    session_config: Config, margin: float = 0.9,
                    on_op: Callable[[str], None] | None = None,
                    variants: tuple[tuple[int, str], ...] = winograd.VARIANTS,
                    time_left: Callable[[], float | None] = lambda: None
                    ) -> list[OpChoice]:
    """For each 3x3 stride-1 Conv (with the Add / Relu after it): time ORT alone on the fused
    nodes and each Winograd variant (tile size x thread split), keep the fastest."""
    if not winograd.supported()[0]:
        return []
    rng = np.random.default_rng(0)
    shapes = shapes_of(model)
    consumers = winograd.node_consumers(model)
    graph_outputs = {o.name for o in model.graph.output}
    choices = []
    for node in model.graph.node:
        base = winograd.winograd_spec(node, consumers, graph_outputs, shapes, consts)
        if base is None:
            continue
        if time_left() == 0.0:
            break
        if on_op:
            on_op(base.node)
        single_model = node_model(model, base)
        feeds = _random_feeds(single_model, rng)
        single = make_session(single_model.SerializeToString(), session_config)
        reference = single.run(None, feeds)[0]
        shape = winograd.winograd_shape(base.params)
        fns: dict[str, Callable[[], object]] = {"ort": lambda: single.run(None, feeds)}
        specs = {}
        for m, split in variants:
            if split == "channels" and not winograd.channels_split_useful(shape, m):
                continue
            spec = winograd.winograd_spec(node, consumers, graph_outputs, shapes, consts,
                                          m=m, split=split)
            try:
                kernel = winograd.WinogradKernel(spec)
                out = kernel(feeds)
            except WpkError:
                continue  # e.g. a compiler that rejects the intrinsics: not a candidate
            error = np.linalg.norm(out - reference) / max(np.linalg.norm(reference), 1e-30)
            if not error <= winograd.TOLERANCE:
                continue  # a variant that rounds too much is never a candidate
            key = f"m{m}-{split}"
            specs[key] = spec
            fns[key] = lambda kernel=kernel: kernel(feeds)
        times = compare_ms(fns, rounds=3, repeats=10)
        ort_ms = times.pop("ort")
        best = min(times, key=times.get) if times else None
        kernel_ms = times[best] if best else math.inf
        chosen = "kernel" if kernel_ms < margin * ort_ms else "ort"
        spec = specs[best] if best else base
        choices.append(OpChoice(spec.node, "winograd", spec.signature(), ort_ms, kernel_ms,
                                {"m": spec.params["m"], "split": spec.params["split"]}
                                if best else None, chosen, len(times), 0, spec))
    return choices


def select_operators(model: onnx.ModelProto, consts: dict[str, np.ndarray],
                     session_config: Config, strategy_factory: Callable[[list[Config]], Any],
                     evaluator_factory: Callable[[str, Callable[[Config], float], int],
                                                 Evaluator],
                     trials_per_op: int, limit: int, margin: float = 0.9,
                     on_op: Callable[[str], None] | None = None,
                     exclude: set[str] = frozenset()) -> list[OpChoice]:
    """For each heavy operator: tune our kernel, time ORT alone on it, keep the faster.
    Operators whose nodes are in `exclude` (taken by another implementation) are skipped."""
    rng = np.random.default_rng(0)
    choices = []
    specs = [s for s in heavy_specs(model, consts, limit + len(exclude))
             if not set(s.node.split("+")) & exclude][:limit]
    for spec in specs:
        if on_op:
            on_op(spec.node)
        compute = spec.compute()
        shapes = {b.name: b.shape for b in compute.buffers}
        feeds = {src: rng.random(shapes[b.name]).astype(np.float32)
                 for src, b in zip(spec.sources[:-1], compute.buffers)
                 if not src.startswith("weight:")}
        single = make_session(node_model(model, spec).SerializeToString(), session_config)
        ort_ms = compare_ms({"ort": lambda: single.run(None, feeds)}, rounds=2, repeats=10)["ort"]
        reference = single.run(None, feeds)[0]
        space = ops.schedule_space(compute)

        def measure(config: Config, spec=spec, feeds=feeds, reference=reference) -> float:
            kernel = BoundKernel(spec, config)
            out = kernel(feeds)
            if not np.allclose(out, reference, rtol=1e-3, atol=1e-3):
                return math.inf  # a wrong kernel is never a candidate
            return compare_ms({"k": lambda: kernel(feeds)}, rounds=1, repeats=10)["k"]

        evaluator = evaluator_factory(spec.signature(), measure, trials_per_op)
        strategy = strategy_factory(ops.seed_configs(compute))
        best = strategy.search(space, evaluator)
        kernel_ms = best.ms if best else math.inf
        chosen = "kernel" if kernel_ms < margin * ort_ms else "ort"
        if best is not None:
            spec.schedule = best.config
        choices.append(OpChoice(spec.node, spec.op, spec.signature(), ort_ms,
                                kernel_ms, best.config if best else None, chosen,
                                evaluator.measured,
                                sum(1 for t in evaluator.history if t.reused), spec))
    return choices


def build_segments(model: onnx.ModelProto, kernels: list[KernelSpec], directory: Path
                   ) -> list[dict[str, Any]]:
    """Cut the model into ORT runs and kernel steps (topological order); write their files."""
    from onnx.utils import Extractor

    extractor = Extractor(shape_inference.infer_shapes(model))
    consts = {i.name for i in model.graph.initializer}
    steps = _segment_steps(model, kernels)
    needed_after = _needed_after(steps, [o.name for o in model.graph.output], consts)
    segments = []
    for index, ((kind, item), needed) in enumerate(zip(steps, needed_after)):
        if kind == "kernel":
            weights = f"kernel{index}.npz"
            np.savez(directory / weights, **item.weights)
            segments.append({"type": "kernel", "spec": item.to_json(), "weights": weights})
            continue
        produced = [o for node in item for o in node.output if o]
        inside = set(produced)
        inputs = list(dict.fromkeys(n for node in item for n in node.input
                                    if n and n not in consts and n not in inside))
        outputs = [o for o in produced if o in needed]
        sub = extractor.extract_model(inputs, outputs)
        path = f"segment{index}.onnx"
        onnx.save(sub, str(directory / path))
        segments.append({"type": "ort", "model": path, "inputs": inputs, "outputs": outputs})
    return segments


def _segment_steps(model: onnx.ModelProto, kernels: list[KernelSpec]
                   ) -> list[tuple[str, Any]]:
    """("ort", the nodes of one ONNX Runtime run) and ("kernel", spec) steps in graph order.
    A fused kernel runs where its *last* node was: its inputs (a residual Add's other
    operand, produced by a downsample Conv between the Conv and the Add) exist by then."""
    by_node = {}
    for spec in kernels:
        for name in spec.node.split("+"):
            by_node[name] = spec
    last_node = {id(by_node[n.name]): n.name for n in model.graph.node if n.name in by_node}
    steps: list[tuple[str, Any]] = []
    run: list[onnx.NodeProto] = []
    for node in model.graph.node:
        spec = by_node.get(node.name)
        if spec is None:
            run.append(node)
            continue
        if node.name != last_node[id(spec)]:
            continue
        if run:
            steps.append(("ort", run))
            run = []
        steps.append(("kernel", spec))
    if run:
        steps.append(("ort", run))
    return steps


def _needed_after(steps: list[tuple[str, Any]], graph_outputs: list[str], consts: set[str]
                  ) -> list[set[str]]:
    """Per step: the tensors later steps (or the graph's outputs) read."""
    needed_after: list[set[str]] = []
    later: set[str] = set(graph_outputs)
    for kind, item in reversed(steps):
        needed_after.append(set(later))
        if kind == "ort":
            later |= {n for node in item for n in node.input if n and n not in consts}
        else:
            later |= set(item.sources[:-1])
    needed_after.reverse()
    return needed_after


@dataclass
class InsideOrt:
    """Generated kernels chosen to run as custom operators inside one ONNX Runtime session."""

    specs: list[KernelSpec]           # kernel j of `library` runs specs[j]
    library: Path
    model: onnx.ModelProto            # ONNX Runtime's saved graph with ai.wpk nodes
    choices: list[OpChoice]
    isa: str = "avx512"               # the library's build (ort_ops.ISAS)


# depthwise variants: hidden-channel blocks per work item
DEPTHWISE_VARIANTS: tuple[int, ...] = (1, 2, 4)
# with the projection fused (a work item is a band of rows, all channels): hidden blocks per
# expansion register tile
PROJECT_VARIANTS: tuple[int, ...] = (1, 4)


def custom_op_variants(site: KernelSpec, winograd_variants: tuple[tuple[int, str], ...],
                       projected: KernelSpec | None = None) -> dict[str, KernelSpec]:
    """The kernel variants worth timing at `site`, by a short key naming the knobs;
    `projected` is the same depthwise site fused with its projection too, where it can be."""
    if site.op == "channel_scale":
        return {"scale": site}
    if site.op in ("nchwc_direct", "direct_gemm"):
        return {"direct": site}
    if site.op in ROW_KINDS:
        return {"row": site}
    if site.op == "nchwc_depthwise":
        blocks = site.params["c"] // 16
        variants = {f"hb{hb}": replace(site, params={**site.params, "hb": hb})
                    for hb in DEPTHWISE_VARIANTS if blocks % hb == 0}
        if projected is not None:
            bands = projected.params.get("threads", 2)   # one band of rows per thread
            for hb in PROJECT_VARIANTS:
                if blocks % hb == 0:
                    variants[f"project-hb{hb}"] = replace(
                        projected, params={**projected.params, "hb": hb, "bands": bands})
        return variants
    shape = winograd.winograd_shape(site.params)
    return {f"m{m}-{split}": replace(site, params={**site.params, "m": m, "split": split})
            for m, split in winograd_variants
            if split != "channels" or winograd.channels_split_useful(shape, m)}


def preferred_variant(site: KernelSpec, keys: dict[str, int], kernels: bool = False
                      ) -> str | None:
    """The variant a site starts from in the descent (None: ONNX Runtime's kernel): the whole
    inverted residual (or else the first variant) for depthwise sites, and the one kernel of
    channel-scale sites, which win far more often than not; ONNX Runtime for Winograd sites,
    which lose on some shapes (their first variant where `kernels`)."""
    if "direct" in keys:          # sparse weights: skipping their zero rows wins by far
        return "direct"
    if not keys or (site.op == "winograd" and not kernels):
        return None
    return next((k for k in keys if k.startswith("project")), next(iter(keys)))


# kernel kinds on row-major tensors (layer norms, NaN guards): in both builds
ROW_KINDS = ("layer_norm", "nan_guard", "attention")
CLEAR_WIN = 0.9   # a kernel this much faster than the nodes it replaces (profiled) stays in


def profiled_times(offline: onnx.ModelProto, pool: list[KernelSpec], chosen: dict[int, int],
                    session_config: Config, feed: dict[str, np.ndarray],
                    output_names: list[str], library: Path
                    ) -> dict[int, tuple[float, float]]:
    """Per chosen site: (our kernel's time, that of the ONNX Runtime nodes it replaces) in
    µs, each timed by ONNX Runtime's profiler in its place in the whole slice (sites the
    profile does not name are left out).

    Why: a site saves 1-5 % of a slice, the size of the noise of whole-slice timings; a
    descent on those alone keeps whichever state the noise first put a site in (half of
    EfficientNet-B0's fused blocks went back to ONNX Runtime that way). Node times are not
    noise-free either, but each compares one site with itself."""
    from wpk.optimizer import ort_ops
    from wpk.optimizer.session import profile_each

    indices = sorted(chosen.values())
    rewritten = ort_ops.custom_op_model(offline, [pool[i] for i in indices], indices)
    plain, with_kernels = profile_each(
        [(offline.SerializeToString(), None), (rewritten.SerializeToString(), str(library))],
        session_config, feed, output_names)
    ort_us, ours_us = plain.nodes, with_kernels.nodes
    times = {}
    for site_index, index in chosen.items():
        spec = pool[index]
        replaced = [ort_us.get(name) for name in spec.node.split("+")]
        key = f"{spec.node}:{ort_ops.OP_TYPES[spec.op]}"
        parts = [t for name, t in ours_us.items() if name == key or name.startswith(key + ":")]
        ours = sum(parts) if parts else None
        if ours is not None and None not in replaced and sum(replaced) > 0:
            times[site_index] = (ours, sum(replaced))
    return times


def select_custom_ops(model: onnx.ModelProto, offline: onnx.ModelProto,
                      session_config: Config, feed: dict[str, np.ndarray],
                      output_names: list[str], margin: float = 0.99,
                      on_op: Callable[[str], None] | None = None,
                      variants: tuple[tuple[int, str], ...] = winograd.VARIANTS,
                      time_left: Callable[[], float | None] = lambda: None,
                      kinds: tuple[str, ...] = ("winograd", "nchwc_depthwise",
                                                "channel_scale", "direct", *ROW_KINDS),
                      passes: int = 2, start_with_kernels: bool = False
                      ) -> InsideOrt | None:
    """For each site of `offline` (ONNX Runtime's saved graph of `model`) our kernels cover
    (3x3 stride-1 NCHWc convolutions: Winograd; depthwise NCHWc convolutions with the 1x1
    expansion before them: fused depthwise), try each kernel variant as a custom operator in
    place of ONNX Runtime's nodes, timing the *whole slice* (one session): coordinate descent
    from every site's preferred variant, one site at a time, the others as chosen so far; a
    site changes (another variant, or back to ONNX Runtime) only where that makes the slice
    faster by `margin`. Whole-slice timing sees what per-operator timing cannot (layouts,
    caches, the thread pool's hand-offs). None when there is nothing to try or no kernel is
    kept. `passes=0` with `start_with_kernels` times nothing: every site runs its preferred
    variant (for tests). Without AVX-512 (`ort_ops.library_isa` "portable") only the sparse
    GEMMs and the row-major transformer kernels (`ROW_KINDS`) are sites: the others work on
    ONNX Runtime's 16-channel NCHWc blocks."""
    from wpk.optimizer import ort_ops, transformer_sites

    isa = ort_ops.library_isa()
    if isa is None:
        return None
    if isa == "portable":
        kinds = tuple(k for k in kinds if k == "direct" or k in ROW_KINDS)
    nchwc = {"winograd", "nchwc_depthwise"} & set(kinds) or \
        ("direct" in kinds and isa != "portable")
    # the Convs behind ONNX Runtime's NCHWc Convs, found once for every finder below
    origins = ort_ops.ConvOrigins.of(offline, model) if nchwc else None
    sites = (ort_ops.nchwc_sites(offline, model, origins=origins)
             if "winograd" in kinds else []) + \
        (ort_ops.depthwise_sites(offline, model, origins=origins)
         if "nchwc_depthwise" in kinds else []) + \
        (ort_ops.channel_scale_sites(offline, model) if "channel_scale" in kinds else []) + \
        transformer_sites.sites(offline, model, [k for k in kinds if k in ROW_KINDS])
    sparse = sparse_sites(offline, model, gemms_only=isa == "portable", origins=origins) \
        if "direct" in kinds else {}
    sites += [site for node, site in sparse.items()
              if not any(s.node == node for s in sites)]
    if not sites:
        return None
    projected = {s.params["name"]: s for s in ort_ops.depthwise_sites(
        offline, model, project=True, origins=origins)} if "nchwc_depthwise" in kinds else {}
    pool, by_site = _variant_pool(sites, projected, variants, sparse)
    descent = _Descent(offline, session_config, feed, output_names, margin, sites, pool,
                       by_site, isa)
    descent.start(start_with_kernels)
    if passes and descent.chosen:
        descent.profile()
    descent.descend(passes, time_left, on_op)
    return descent.result()


SPARSE_KEPT = 0.8   # a convolution is a sparse site where its kernel keeps at most this work


def sparse_sites(offline: onnx.ModelProto, model: onnx.ModelProto,
                 gemms_only: bool = False, origins: ConvOrigins | None = None
                 ) -> dict[str, KernelSpec]:
    """The direct convolution and GEMM sites (by node) whose weights let the kernel skip
    enough zero rows (tile-wise, block or channel sparsity, `direct_conv.kept_fraction`);
    dense weights are left to ONNX Runtime's own kernels, which run near this CPU's peak.
    `gemms_only`: no convolutions (the portable build)."""
    from wpk.optimizer import direct_conv, ort_ops

    if not any(_zero_share(init) >= 1 - SPARSE_KEPT for init in model.graph.initializer):
        return {}           # no weight could qualify: skip the site finders' work
    found = {}
    convolutions = [] if gemms_only else ort_ops.direct_sites(offline, model, origins=origins)
    for site in convolutions + ort_ops.gemm_sites(offline, model):
        shape = direct_conv.direct_shape(site.params)
        groups = direct_conv.groups_for(shape, site.weights["Wt"])
        if direct_conv.kept_fraction(shape, groups) <= SPARSE_KEPT:
            found[site.node] = site
    return found


def _zero_share(init: onnx.TensorProto) -> float:
    """The share of an initializer's elements that are zero (0 for non-float or tiny ones)."""
    if init.data_type != onnx.TensorProto.FLOAT or np.prod(init.dims, dtype=np.int64) < 256:
        return 0.0
    values = numpy_helper.to_array(init)
    return float(np.count_nonzero(values == 0)) / values.size


def _variant_pool(sites: list[KernelSpec], projected: dict[str, KernelSpec],
                  variants: tuple[tuple[int, str], ...],
                  sparse: dict[str, KernelSpec] | None = None
                  ) -> tuple[list[KernelSpec], list[dict[str, int]]]:
    """Every variant of every site, for one library (kernel index = position in the pool),
    and per site its variants' pool indices by key (a sparse convolution's direct kernel is
    one more variant of its Winograd site)."""
    pool: list[KernelSpec] = []
    by_site: list[dict[str, int]] = []
    for site in sites:
        keys = {}
        alternative = projected.get(site.params["name"]) if site.op == "nchwc_depthwise" \
            else None
        options = custom_op_variants(site, variants, alternative)
        if site.op == "winograd" and sparse and site.node in sparse:
            options["direct"] = sparse[site.node]
        for key, spec in options.items():
            keys[key] = len(pool)
            pool.append(spec)
        by_site.append(keys)
    return pool, by_site


class _Descent:
    """The coordinate descent of `select_custom_ops`: the pool variant each site runs
    (`chosen`: site index -> pool index; a site not in it runs ONNX Runtime's nodes), the
    session that runs them (`current`), and what each site's last visit measured."""

    def __init__(self, offline: onnx.ModelProto, session_config: Config,
                 feed: dict[str, np.ndarray], output_names: list[str], margin: float,
                 sites: list[KernelSpec], pool: list[KernelSpec],
                 by_site: list[dict[str, int]], isa: str = "avx512") -> None:
        from wpk.optimizer import ort_ops

        self.offline, self.session_config, self.margin = offline, session_config, margin
        self.feed, self.output_names = feed, output_names
        self.sites, self.pool, self.by_site, self.isa = sites, pool, by_site, isa
        self.library = ort_ops.build_library([ort_ops.op_kernel(s, i, isa)
                                              for i, s in enumerate(pool)])
        self.reference = make_session(offline.SerializeToString(), session_config,
                                      offline_optimized=True).run(output_names, feed)
        self.chosen: dict[int, int] = {}
        self.current = None
        self.settled: set[int] = set()     # clearly faster: only its variants are compared
        self.profiled: dict[int, tuple[float, float]] = {}   # site: (ours, ORT's) µs in place
        self.choices: dict[int, OpChoice] = {}

    def session(self, chosen: dict[int, int]):
        from wpk.optimizer import ort_ops

        indices = sorted(chosen.values())
        rewritten = ort_ops.custom_op_model(self.offline, [self.pool[i] for i in indices],
                                            indices)
        return make_session(rewritten.SerializeToString(), self.session_config,
                            offline_optimized=True, custom_ops=str(self.library))

    def close_enough(self, outputs: list[np.ndarray]) -> bool:
        return all(np.linalg.norm(o - r) <= winograd.TOLERANCE * max(np.linalg.norm(r), 1e-30)
                   for o, r in zip(outputs, self.reference))

    def overlapping(self, assignment: dict[int, int]) -> bool:
        """Whether two chosen kernels would replace the same node (MobileNetV1-style chains:
        one block's projection is the next block's expansion)."""
        names = [n for index in assignment.values() for n in self.pool[index].node.split("+")]
        return len(names) != len(set(names))

    def works(self, assignment: dict[int, int]):
        """A session of `assignment` (site -> pool index) if it runs within tolerance."""
        if self.overlapping(assignment):
            return None
        try:
            candidate = self.session(assignment)
            return candidate if self.close_enough(candidate.run(self.output_names, self.feed)) \
                else None
        except Exception:
            return None       # a variant ONNX Runtime refuses is not a candidate

    def start(self, start_with_kernels: bool) -> None:
        """Every site's preferred variant (a gain too small to see alone still adds up), or
        those that run alone where that fails, or none."""
        start = {i: preferred_variant(site, keys, start_with_kernels)
                 for i, (site, keys) in enumerate(zip(self.sites, self.by_site))}
        chosen: dict[int, int] = {}
        for i, key in start.items():
            if key is not None and not self.overlapping({**chosen, i: self.by_site[i][key]}):
                chosen[i] = self.by_site[i][key]
        current = self.works(chosen)
        if current is None:       # some kernel fails here: start from those that run alone
            chosen = {i: index for i, index in chosen.items()
                      if self.works({i: index}) is not None}
            current = self.works(chosen)
        if current is None:
            chosen, current = {}, self.session({})
        self.chosen, self.current = chosen, current

    def profile(self) -> None:
        """Sites slower in place than ONNX Runtime's nodes (by its profiler): out; clearly
        faster: settled, only their variants are compared from here on."""
        self.profiled = profiled_times(self.offline, self.pool, self.chosen,
                                       self.session_config, self.feed, self.output_names,
                                       self.library)
        self.chosen = {i: index for i, index in self.chosen.items()
                       if i not in self.profiled or self.profiled[i][0] < self.profiled[i][1]}
        self.settled = {i for i, (ours, theirs) in self.profiled.items()
                        if ours < CLEAR_WIN * theirs}
        self.current = self.works(self.chosen) or self.session({})

    def descend(self, passes: int, time_left: Callable[[], float | None],
                on_op: Callable[[str], None] | None) -> None:
        """A second pass gives each site another look in the context the first one settled
        on (a verdict within the timing noise can go either way); a pass that changes
        nothing ends it."""
        for round_ in range(passes):
            changed = False
            for site_index, site in enumerate(self.sites):
                if time_left() == 0.0:
                    break
                if on_op and round_ == 0:
                    on_op(site.node)
                changed = self.revisit(site_index) or changed
            if not changed or time_left() == 0.0:
                break

    def revisit(self, site_index: int) -> bool:
        """Time the site's other variants (and ONNX Runtime's kernel) in the slice as chosen
        so far; switch where that is faster by `margin`. True if the site changed."""
        keys = self.by_site[site_index]
        mine = self.chosen.get(site_index)
        times, trials = self._time_options(site_index, mine)
        current_key = next((k for k, v in keys.items() if v == mine), "ort")
        times[current_key] = times.pop("current")
        best = min(times, key=times.get)
        changed = best != current_key and times[best] < self.margin * times[current_key]
        if changed:
            self.chosen, self.current = trials[best]
        else:
            best = current_key
        self.choices[site_index] = self._choice(site_index, times, best, current_key)
        return changed

    def _time_options(self, site_index: int, mine: int | None
                      ) -> tuple[dict[str, float], dict[str, tuple[dict[int, int], Any]]]:
        """The slice's time ("current": as chosen) and each other option's for the site,
        timed together; (the assignment, session) of each option that runs."""
        keys = self.by_site[site_index]
        options: dict[str, int | None] = {key: index for key, index in keys.items()
                                          if index != mine}
        if mine is not None and site_index not in self.settled:
            options["ort"] = None
        run = {"current": lambda s=self.current: s.run(self.output_names, self.feed)}
        trials = {}
        for key, index in options.items():
            assignment = {k: v for k, v in self.chosen.items() if k != site_index}
            if index is not None:
                assignment[site_index] = index
            candidate = self.works(assignment)
            if candidate is not None:
                trials[key] = (assignment, candidate)
                run[key] = lambda s=candidate: s.run(self.output_names, self.feed)
        return compare_ms(run, rounds=5, repeats=20), trials

    def _choice(self, site_index: int, times: dict[str, float], best: str,
                current_key: str) -> OpChoice:
        """The report's row for the site: the kernel in use, or the fastest one where ONNX
        Runtime's stays (a settled site's ONNX Runtime time: the slice's, plus what the
        profile says its nodes took over the kernel)."""
        site, keys = self.sites[site_index], self.by_site[site_index]
        if site_index in self.settled:
            ours, theirs = self.profiled[site_index]
            ort_ms = times[current_key] + (theirs - ours) / 1000.0
        else:
            ort_ms = times.get("ort", math.inf)
        kernel_times = {k: t for k, t in times.items() if k != "ort"}
        fastest = best if best != "ort" else \
            (min(kernel_times, key=kernel_times.get) if kernel_times else None)
        spec = self.pool[keys[fastest]] if fastest else site
        knobs = {"nchwc_depthwise": ("hb", "cout", "bands"), "winograd": ("m", "split")
                 }.get(spec.op, ())
        return OpChoice(
            spec.node, f"{spec.op}-op", spec.signature(), ort_ms,
            kernel_times[fastest] if fastest else math.inf,
            {k: spec.params.get(k) for k in knobs} if fastest and knobs else None,
            "ort" if best == "ort" else "kernel", len(times), 0, spec)

    def result(self) -> InsideOrt | None:
        """The chosen kernels in one library of their own, or None where none was kept."""
        from wpk.optimizer import ort_ops

        if not self.chosen:
            return None
        indices = sorted(self.chosen.values())
        specs = [self.pool[i] for i in indices]
        final = ort_ops.build_library([ort_ops.op_kernel(s, j, self.isa)
                                       for j, s in enumerate(specs)])
        return InsideOrt(specs, final, ort_ops.custom_op_model(self.offline, specs),
                         [self.choices[i] for i in sorted(self.choices)], self.isa)
