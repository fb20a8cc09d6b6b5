"""The WPK pipeline for one slice on this machine: graph passes, session configuration search,
precision (int8 within an accuracy budget), per-operator selection, accuracy guard, and the
final side-by-side measurement that falls back to the default when nothing beats it."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from wpk.errors import WpkError, ort_error_line
from wpk.graph import (infer_shapes, load_model, without_initializer_inputs,
                       without_trailing_empty_inputs)
from wpk.naming import name_nodes
from wpk.tensor_spec import ort_type_of
from wpk.optimizer import accuracy, calibration, gain_breakdown, passes
from wpk.optimizer.database import TuningLog
from wpk.optimizer.executor import FORMAT_VERSION, MANIFEST, load, tensor_specs
from wpk.optimizer.kernels import load_initializers
from wpk.optimizer.measure import (DECIDE_SETTLE_S, Ratio, compare_ratio, hardware_id,
                                   load_average, time_ms)
from wpk.optimizer.search import Evaluator, make_strategy
from wpk.optimizer.selection import (ROW_KINDS, InsideOrt, OpChoice, build_segments,
                                     select_custom_ops, select_operators, select_winograd)
from wpk.optimizer.session import DEFAULT_SESSION, make_session, session_space
from wpk.optimizer.space import Config

# a candidate must be this much faster than the default to be kept (worth its complexity)
KEEP_FACTOR = 1.05
# interleaved rounds of the first head-to-head of each candidate, and of the confirming one
# (pooled with the first) that the most promising get
FIRST_ROUNDS = 8
CONFIRM_ROUNDS = 12
# candidates (best first) that get the confirming head-to-head before giving up
CONFIRM_TRIES = 2


@dataclass
class Budget:
    trials: int = 48
    seconds: float | None = None

    def share(self, fraction: float) -> int:
        return max(2, int(self.trials * fraction))


@dataclass
class Options:
    strategy: str = "ga"
    budget: Budget = field(default_factory=Budget)
    accuracy_budget: float | None = None   # relative L2 error allowed for int8; None = fp32
    per_operator: bool = True
    operator_limit: int = 6
    winograd: bool = True                  # try Winograd kernels on 3x3 stride-1 convolutions
    samples: int = 3
    log_path: str | None = None
    seed: int = 0
    openvino: bool = True                  # OpenVINO's CPU plugin as a candidate, if installed
    # real samples for int8 calibration and the guard: .npz / .npy directory path, arrays by
    # input name (first axis = samples) or a list of feeds; None = random inputs
    calibration_data: Any = None


@dataclass
class Report:
    model: str
    hardware: str
    passes: list[str] = field(default_factory=list)
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    session_search: dict[str, Any] = field(default_factory=dict)
    operators: list[dict[str, Any]] = field(default_factory=list)
    chosen: str = "default"
    candidate_kind: str = ""             # the CANDIDATE_KINDS name that added `chosen`
    reason: str = ""
    speedup: float = 1.0                 # median of per-round ratios (1.0: the default)
    speedup_interval: list[float] | None = None   # its 95 % interval
    noisy: bool = False                  # a gain the timing noise did not let us confirm
    load_average: float | None = None    # the machine's load while the candidates were timed
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    sparsity: dict[str, Any] = field(default_factory=dict)   # `sparsity_summary`
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class Progress:
    """Callbacks the CLI turns into rich progress bars (no-ops by default)."""

    def phase(self, name: str, total: int | None = None) -> None: ...

    def advance(self, text: str = "") -> None: ...


def _io(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    inferred = infer_shapes(model, {}, model.graph.name or "model")
    consts = {i.name for i in model.graph.initializer}

    def arg(value: onnx.ValueInfoProto) -> dict:
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else \
            "float32"
        return {"name": value.name, "shape": shape,
                "type": ort_type_of(dtype)}

    outputs = {o.name: o for o in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return ([arg(i) for i in inferred.graph.input if i.name not in consts],
            [arg(outputs.get(o.name, o)) for o in model.graph.output])


@dataclass
class _SliceIO:
    """What every manifest names: the slice, the machine, its inputs and outputs."""
    name: str
    hardware: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]


@dataclass
class _Job:
    """One `optimize` run: what its steps read."""
    options: Options
    progress: Progress
    report: Report
    log: TuningLog
    io: _SliceIO
    feeds: list[dict[str, np.ndarray]]               # the accuracy guard's
    calibration_feeds: list[dict[str, np.ndarray]]   # int8 calibration's
    original: onnx.ModelProto
    model: onnx.ModelProto                           # after the graph passes (if they held)
    model_bytes: bytes
    reference: Callable[[dict[str, np.ndarray]], list[np.ndarray]]   # ORT defaults
    out_dir: Path
    start: float
    deadline: float | None

    @property
    def output_names(self) -> list[str]:
        return self.io.output_names

    def left(self) -> float | None:
        """Seconds left of the time budget (None: no time limit)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.perf_counter())

    def evaluator(self, task: str, measure: Callable[[Config], float], trials: int
                  ) -> Evaluator:
        remaining = self.left()
        return Evaluator(task, measure, self.io.hardware, self.log, max_trials=trials,
                         max_seconds=None if remaining is None else remaining,
                         on_trial=lambda t: self.progress.advance(f"{task[:40]} {t.ms:.3f} ms"))

    def strategy(self, seeds: list[Config]):
        return make_strategy(self.options.strategy, self.options.seed, seeds)


@dataclass
class Candidate:
    """One way to run the slice, written to its own directory and measured exactly as
    loaded: its precision (which accuracy budget applies), its description in the report,
    how long the machine settles before each timing round, and the kind that added it."""
    directory: Path
    precision: str
    describe: str
    settle_s: float = DECIDE_SETTLE_S
    kind: str = ""


@dataclass
class _Run:
    """What the candidate kinds share: the session configuration the search chose, the
    candidates so far (sessions are opened one pair at a time at the end: many live thread
    pools on the same cores would slow each other down and bias the comparison) and the
    operators already running inside ONNX Runtime; `kind` is the candidate kind adding now."""
    job: _Job
    tmp: Path
    config: Config
    candidates: dict[str, Candidate] = field(default_factory=dict)
    inside_ort: list[OpChoice] = field(default_factory=list)
    in_place: dict[str, float | int | str] | None = None   # gain_breakdown's, "custom-ops"
    kind: str = ""

    def add(self, key: str, directory: Path, precision: str, describe: str,
            settle_s: float = DECIDE_SETTLE_S) -> None:
        self.candidates[key] = Candidate(directory, precision, describe, settle_s, self.kind)


def optimize(source: str | Path | onnx.ModelProto, out_dir: str | Path,
             options: Options | None = None, progress: Progress | None = None,
             name: str | None = None) -> Report:
    """Optimize one model (a slice) for this machine and write `out_dir`."""
    options = options or Options()
    progress = progress or Progress()
    start = time.perf_counter()
    original = onnx.ModelProto()
    original.CopyFrom(source if isinstance(source, onnx.ModelProto) else load_model(source))
    # every pass finds nodes by name: unnamed and duplicate-named nodes get wpk's stable names
    name_nodes(original)
    without_initializer_inputs(original)
    without_trailing_empty_inputs(original.graph)
    name = name or (Path(source).stem if not isinstance(source, onnx.ModelProto)
                    else original.graph.name)
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    hardware = hardware_id()
    report = Report(model=name, hardware=hardware)
    log = TuningLog(options.log_path) if options.log_path else TuningLog(None)
    inputs, outputs = _io(original)
    io = _SliceIO(name, hardware, inputs, outputs)
    specs = tensor_specs(inputs)
    if options.calibration_data is not None:  # real samples: calibration, held-out guard part
        data = calibration.load(options.calibration_data, specs)
        feeds, calibration_feeds = data.guard, data.calibration
        report.calibration = data.describe()
    else:
        feeds = calibration_feeds = accuracy.sample_inputs(specs, options.samples, options.seed)
        report.calibration = {"source": "random inputs", "calibration_samples": len(feeds),
                              "guard_samples": len(feeds), "held_out": False}
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if options.budget.seconds is None else start + options.budget.seconds
    progress.phase("graph passes")
    reference, model, model_bytes = _graph_passes(original, name, io.output_names, feeds,
                                                  report)
    report.sparsity = sparsity_summary(model)
    job = _Job(options, progress, report, log, io, feeds, calibration_feeds, original, model,
               model_bytes, reference, out_dir, start, deadline)
    with tempfile.TemporaryDirectory() as tmp:
        return _search_and_write(job, Path(tmp))


def _graph_passes(original: onnx.ModelProto, name: str, output_names: list[str],
                  feeds: list[dict[str, np.ndarray]], report: Report
                  ) -> tuple[Callable[[dict[str, np.ndarray]], list[np.ndarray]],
                             onnx.ModelProto, bytes]:
    """(the reference: `original` under ONNX Runtime's defaults, the model after wpk's graph
    passes, its bytes); the passes are dropped where they change the outputs."""
    original_bytes = original.SerializeToString()
    try:
        default = make_session(original_bytes, DEFAULT_SESSION)
    except Exception as error:  # ORT's own exception types: the model, not our bug
        raise WpkError(f"{name}: ONNX Runtime cannot load it: {ort_error_line(error)}"
                       ) from None
    reference = lambda f: default.run(output_names, f)  # noqa: E731
    model, report.passes = passes.run_passes(original)
    model_bytes = model.SerializeToString()
    errors = accuracy.compare(reference, lambda f: make_session(model_bytes, DEFAULT_SESSION)
                              .run(output_names, f), feeds[:1], output_names)
    if not accuracy.within(errors, accuracy.FP32_RELATIVE):
        model, model_bytes = original, original_bytes
        report.passes.append("passes changed outputs beyond fp32 rounding: dropped")
    return reference, model, model_bytes


MIN_ZERO_SHARE = 0.01   # fewer zeros than this in a weight are chance, not sparsity


def sparsity_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """The structured sparsity already in the weights (`sparsity.detect`): per pattern, how
    many layers hold it, and the layers with zeros; empty for a dense model."""
    from wpk.optimizer import sparsity

    layers = [layer for layer in sparsity.detect(model) if layer.zeros >= MIN_ZERO_SHARE]
    if not layers:
        return {}
    patterns = Counter(layer.summary for layer in layers)
    return {"patterns": dict(patterns), "layers": [layer.to_json() for layer in layers],
            "line": "; ".join(f"{count} layer{'s' * (count > 1)} {pattern}"
                              for pattern, count in patterns.most_common())}


def describe_session(config: Config) -> str:
    provider = config["provider"].replace("ExecutionProvider", "")
    threads = config["threads"] or "auto"
    mode = "seq" if config["execution_mode"] == "sequential" else "par"
    return f"{provider} t={threads} {mode} {config['graph_level']}"


def _search_and_write(job: _Job, tmp: Path) -> Report:
    """The session search, each candidate kind in turn, then the accuracy guard and the
    timing that chooses one; the chosen candidate is installed in `job.out_dir`."""
    run = _Run(job, tmp, _search_session(job))
    for kind, add_candidates in CANDIDATE_KINDS.items():
        run.kind = kind
        add_candidates(run)
    best_key = _guard_and_decide(run)
    _install_and_report(run, best_key)
    return job.report


def _search_session(job: _Job) -> Config:
    """The best ONNX Runtime session configuration the search strategy finds for the model
    (ORT's defaults where it measures nothing)."""
    options, report = job.options, job.report
    space = session_space()
    trials = min(options.budget.share(0.25), sum(1 for _ in space))
    job.progress.phase("session configuration", trials)
    model_bytes, output_names, feed = job.model_bytes, job.output_names, job.feeds[0]

    def measure_session(config: Config) -> float:
        session = make_session(model_bytes, config)
        return time_ms(lambda: session.run(output_names, feed), repeats=15, max_seconds=1.5)

    digest = hashlib.sha256(model_bytes).hexdigest()[:16]
    search = job.evaluator(f"session:{digest}", measure_session, trials)
    best = job.strategy([dict(DEFAULT_SESSION)]).search(space, search)
    best_config = best.config if best else dict(DEFAULT_SESSION)
    report.session_search = {"strategy": options.strategy, "measured": search.measured,
                             "reused": sum(1 for t in search.history if t.reused),
                             "best": best_config, "best_ms": best.ms if best else None,
                             "trials": [{"config": t.config, "ms": t.ms}
                                        for t in search.history]}
    return best_config


def _ort_candidates(run: _Run) -> None:
    """ONNX Runtime: with its defaults, with the passes and the searched configuration, and
    (on the CPU) with its own offline-optimized graph."""
    job, config = run.job, run.config
    run.add("default", _write_single(run.tmp / "default", job.io, job.original,
                                     dict(DEFAULT_SESSION), "fp32", offline=False),
            "fp32", "ONNX Runtime defaults")
    run.add("tuned", _write_single(run.tmp / "tuned", job.io, job.model, config, "fp32",
                                   offline=False),
            "fp32", "passes + " + describe_session(config))
    if config["provider"] == "CPUExecutionProvider":
        run.add("offline", _write_single(run.tmp / "offline", job.io, job.model, config,
                                         "fp32", offline=True),
                "fp32", "passes + ORT offline graph, " + describe_session(config))


def _int8_candidate(run: _Run) -> None:
    """Static QDQ int8, where an accuracy budget allows lossy results."""
    job = run.job
    if job.options.accuracy_budget is None:
        return
    job.progress.phase("int8 static quantization")
    try:
        int8_model = onnx.load(str(_quantize_int8(job.model, job.calibration_feeds, run.tmp)))
        run.add("int8", _write_single(run.tmp / "int8", job.io, int8_model, run.config,
                                      "int8", offline=False),
                "int8", "static QDQ int8, " + describe_session(run.config))
    except Exception as error:  # quantization tools fail on some graphs: say so, go on
        job.report.candidates["int8"] = {"error": f"{type(error).__name__}: {error}"[:200]}


def _openvino_candidates(run: _Run) -> None:
    """OpenVINO's CPU plugin, where the options allow it."""
    if run.job.options.openvino:
        run.job.progress.phase("OpenVINO (CPU plugin)")
        _add_openvino(run)


def _custom_ops_candidate(run: _Run) -> None:
    """Generated kernels as custom operators in ONNX Runtime's offline graph, where there is
    one and per-operator selection has time."""
    job = run.job
    options = job.options
    offline_model = run.tmp / "offline" / "model.ort.onnx"
    if options.per_operator and offline_model.exists() and options.operator_limit > 0 and \
            job.left() != 0.0:
        job.progress.phase("generated kernels inside ONNX Runtime (whole-slice timing)")
        run.inside_ort = _add_custom_ops(run, onnx.load(str(offline_model)))
        job.report.operators = [c.to_json() for c in run.inside_ort]


def _segments_candidate(run: _Run) -> None:
    """Generated kernels as segments between ONNX Runtime sessions (on the CPU): Winograd
    only where it could not run inside ONNX Runtime (the cuts cost more than the kernels save
    wherever both are possible), then the operators per-operator selection times."""
    job, config = run.job, run.config
    options, progress = job.options, job.progress
    if not options.per_operator or config["provider"] != "CPUExecutionProvider":
        return
    consts = load_initializers(job.model)
    per_op = max(2, options.budget.share(0.6) // max(1, options.operator_limit))
    choices: list[OpChoice] = []
    if options.winograd and not any(c.chosen == "kernel" for c in run.inside_ort) and \
            options.operator_limit > 0 and job.left() != 0.0:
        progress.phase("per-operator selection: Winograd 3x3 convolutions")
        choices = select_winograd(job.model, consts, config,
                                  on_op=lambda name: progress.advance(name),
                                  time_left=job.left)
    taken = {name for c in choices if c.chosen == "kernel" for name in c.node.split("+")}
    progress.phase("per-operator selection", per_op * options.operator_limit)
    choices += select_operators(job.model, consts, config, job.strategy, job.evaluator,
                                per_op, options.operator_limit, exclude=taken)
    job.report.operators += [c.to_json() for c in choices]
    won = [c.spec for c in choices if c.chosen == "kernel"]
    if won:
        mixed_dir = run.tmp / "mixed"
        mixed_dir.mkdir()
        segments = build_segments(job.model, won, mixed_dir)
        _write_manifest(mixed_dir, job.io, config, segments, "fp32", "mixed")
        run.add("mixed", mixed_dir, "fp32", f"segments: {len(won)} generated kernel(s) + ORT")


# each adds the candidates of one kind where they apply, in this order (custom operators
# before segments, which skip Winograd where it already runs inside ONNX Runtime); the name
# of the chosen candidate's kind is its manifest's `candidate_kind`
CANDIDATE_KINDS: dict[str, Callable[[_Run], None]] = {
    "onnxruntime": _ort_candidates, "int8": _int8_candidate,
    "openvino": _openvino_candidates, "custom-ops": _custom_ops_candidate,
    "segments": _segments_candidate}


def _guard_and_decide(run: _Run) -> str:
    """Each candidate within its accuracy budget is timed head to head against the default;
    `decide` chooses. The chosen key (with the report's reason, speedup and gains set)."""
    job, candidates, report = run.job, run.candidates, run.job.report
    output_names, feed = job.output_names, job.feeds[0]
    job.progress.phase("accuracy guard and final timing", len(candidates))
    default_slice = load(candidates["default"].directory)
    run_default = lambda: default_slice.run(output_names, feed)  # noqa: E731
    measured: dict[str, Ratio] = {}

    def head_to_head(key: str, candidate=None, rounds: int = FIRST_ROUNDS) -> Ratio:
        candidate = candidate or load(candidates[key].directory)
        return compare_ratio(run_default, lambda: candidate.run(output_names, feed),
                             rounds=rounds, repeats=10, settle_s=candidates[key].settle_s)

    report.load_average = load_average()
    for key, cand in candidates.items():
        if key == "default":
            continue
        session = load(cand.directory)   # one load (one compile) for accuracy and timing
        if _within_budget(job, key, cand, session):
            measured[key] = head_to_head(key, session)
            report.candidates[key].update(measured[key].to_json())
        del session
        job.progress.advance(key)
    report.candidates = {"default": {"describe": candidates["default"].describe,
                                     "precision": "fp32", "accuracy": [],
                                     "within_budget": True}, **report.candidates}
    best_key, report.reason, report.noisy = decide(measured, head_to_head, report.candidates)
    report.speedup = measured[best_key].speedup if best_key != "default" else 1.0
    report.speedup_interval = list(measured[best_key].interval) if best_key != "default" \
        else None
    report.chosen = best_key
    for key, kinds in (("custom-ops", True), ("mixed", False)):
        if key in measured:
            report.candidates[key].update(operator_gains(report.operators, kinds,
                                                         measured[key]))
    if "custom-ops" in measured:
        offline = measured.get("offline")
        # the offline candidate's ratio on the custom-ops timing's own baseline, so that the
        # two shares add up to that timing's gain (each was timed against its own baseline)
        baseline_ms = measured["custom-ops"].baseline_ms
        report.candidates["custom-ops"].update(
            in_place=run.in_place,
            offline_gain_ms=baseline_ms * (1.0 - 1.0 / offline.speedup) if offline else None)
    return best_key


def _within_budget(job: _Job, key: str, cand: Candidate, session) -> bool:
    """The accuracy guard for one loaded candidate (its report entry is written here)."""
    errs = accuracy.compare(job.reference, lambda f: session.run(job.output_names, f),
                            job.feeds, job.output_names)
    budget = accuracy.FP32_RELATIVE if cand.precision == "fp32" else \
        job.options.accuracy_budget
    ok = accuracy.within(errs, budget)
    job.report.candidates[key] = {"describe": cand.describe, "precision": cand.precision,
                                  "accuracy": [e.to_json() for e in errs], "within_budget": ok}
    return ok


def _install_and_report(run: _Run, best_key: str) -> None:
    """Installs the chosen candidate, guards the directory as the runtime will load it, and
    writes report.json and report.md beside it."""
    job, report = run.job, run.job.report
    best = run.candidates[best_key]
    report.candidate_kind = best.kind
    _install(best.directory, job.out_dir, best_key, best.kind)
    final = load(job.out_dir)
    errs = accuracy.compare(job.reference, lambda f: final.run(job.output_names, f),
                            job.feeds, job.output_names)
    report.accuracy = [e.to_json() for e in errs]
    report.seconds = time.perf_counter() - job.start
    (job.out_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2,
                                                        default=str) + "\n")
    (job.out_dir / "report.md").write_text(render_markdown(report))


def operator_gains(operators: list[dict[str, Any]], inside_ort: bool, ratio: Ratio
                   ) -> dict[str, Any]:
    """What the chosen kernels of one candidate save one by one (ONNX Runtime's time minus
    the kernel's, as per-operator selection measured it: in the whole slice for kernels
    inside ONNX Runtime, alone for segment kernels), next to what the candidate saves end to
    end: where the sum is larger, the difference is what integration costs (layout
    conversions, segment boundaries, the thread pool's hand-offs, caches)."""
    kernels = [op for op in operators if op["chosen"] == "kernel" and
               op["op"].endswith("-op") == inside_ort and
               math.isfinite(op["ort_ms"]) and math.isfinite(op["kernel_ms"])]
    return {"kernels": len(kernels),
            "operator_gains_ms": sum(op["ort_ms"] - op["kernel_ms"] for op in kernels),
            "end_to_end_gain_ms": ratio.baseline_ms - ratio.candidate_ms}


def decide(measured: dict[str, Ratio], remeasure: Callable[..., Ratio],
           candidates: dict[str, dict[str, Any]]) -> tuple[str, str, bool]:
    """(chosen key, the reason in words, whether the machine was too noisy to decide).

    A candidate is kept only where the interleaved rounds show it faster than the default by
    KEEP_FACTOR and faster at all across the 95 % interval of the per-round ratios. The
    promising ones (best first) get a second, longer measurement pooled with the first, so
    that one lucky run decides nothing; where the estimate is a gain but the interval
    reaches below 1.0x, the machine was too noisy to tell and the default is kept."""
    promising = sorted((k for k, r in measured.items() if r.speedup >= KEEP_FACTOR),
                       key=lambda k: -measured[k].speedup)
    noisy, unconfirmed = [], []
    for key in promising[:CONFIRM_TRIES]:
        pooled = measured[key].merged(remeasure(key, rounds=CONFIRM_ROUNDS))
        measured[key] = pooled
        candidates[key].update(pooled.to_json(), confirmed=pooled.faster_by(KEEP_FACTOR))
        if pooled.faster_by(KEEP_FACTOR):
            return key, (f"{key}: {pooled.describe()} faster than the default"
                         + (f" ({', '.join(unconfirmed + noisy)} not confirmed)"
                            if unconfirmed or noisy else "")), False
        (noisy if pooled.speedup >= KEEP_FACTOR else unconfirmed).append(key)
    gain = f"{(KEEP_FACTOR - 1) * 100:.0f} %"
    if noisy:
        key = noisy[0]
        return "default", (f"too noisy to decide: {key} measured {measured[key].describe()}, "
                           f"an interval that does not rule out no gain; keeping the default "
                           f"(measure on an idle machine)"), True
    if unconfirmed:
        key = unconfirmed[0]
        return "default", (f"best candidate {key} did not hold a {gain} gain when measured "
                           f"again ({measured[key].describe()}): keeping the default"), False
    fastest = max(measured, key=lambda k: measured[k].speedup, default=None)
    if fastest is not None and measured[fastest].speedup > 1.0:
        return "default", (f"best candidate {fastest} ({measured[fastest].describe()}) does "
                           f"not beat the default by {gain}: keeping the default"), False
    return "default", "nothing beat the default", False


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def speedup_cell(cand: dict[str, Any]) -> str:
    """A candidate's speedup over the default with its 95 % interval and rounds, or "-"."""
    if "speedup" not in cand:
        return "-"
    return (f"{cand['speedup']:.2f}x ({cand['speedup_low']:.2f}-{cand['speedup_high']:.2f}, "
            f"{cand['rounds']} rounds)")


def render_markdown(report: Report) -> str:
    """The human-readable report: what was tried, what was chosen and why."""
    load = "" if report.load_average is None else \
        f" Load average while timing: {report.load_average:.2f} on {os.cpu_count()} cores."
    lines = [f"# {report.model}: chose `{report.chosen}` ({report.speedup:.2f}x vs ORT defaults)",
             "", f"Measured on: {report.hardware}.{load} {report.reason}.", "",
             "Graph passes: " + ("; ".join(report.passes) or "no change"), "",
             "Sparsity in the weights: " + (report.sparsity.get("line") or "none") + ".", "",
             "Speedups are medians of per-round ratios from rounds that time the candidate and "
             "the default back to back, with the 95 % interval of that median.", "",
             "| candidate | precision | ms | default ms (same rounds) | speedup (95 % interval) "
             "| max rel. error | top-1 | kept | what |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, cand in report.candidates.items():
        if "error" in cand or "skipped" in cand:
            status = "failed" if "error" in cand else "skipped"
            lines.append(f"| {key} | | | | | | | {status} | "
                         f"{cand.get('error') or cand['skipped']} |")
            continue
        rel = max((a["relative"] for a in cand["accuracy"]), default=0.0)
        top1 = [a["top1_agreement"] for a in cand["accuracy"] if a["top1_agreement"] is not None]
        lines.append(f"| {key} | {cand['precision']} | {_ms(cand.get('ms'))} | "
                     f"{_ms(cand.get('default_ms'))} | {speedup_cell(cand)} | {rel:.2e} | "
                     f"{min(top1) if top1 else '-'} | "
                     f"{'yes' if cand['within_budget'] else 'over budget'} | {cand['describe']} |")
    for key, cand in report.candidates.items():
        if "operator_gains_ms" in cand:
            lines += ["", gain_breakdown.explain(key, cand)]
    search = report.session_search
    lines += ["", f"Session search ({search.get('strategy')}): {search.get('measured')} measured, "
                  f"{search.get('reused')} from the tuning log, best {search.get('best')} "
                  f"at {search.get('best_ms') or float('nan'):.3f} ms.", ""]
    if report.operators:
        lines += ["| operator | kind | ORT ms | generated ms | chosen | schedule |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for op in report.operators:
            lines.append(f"| {op['node']} | {op['op']} | {op['ort_ms']:.3f} | "
                         f"{op['kernel_ms']:.3f} | {op['chosen']} | {op['schedule']} |")
    cal = report.calibration
    if cal:
        lines += [f"Sample inputs: {cal['source']}: {cal['calibration_samples']} for int8 "
                  f"calibration, {cal['guard_samples']} for the accuracy guard"
                  + (" (held out)" if cal["held_out"] else "") + "."]
    lines += ["", "Accuracy of the written slice (per output): " + ", ".join(
        f"{a['name']}: max abs {a['max_abs']:.2e}, rel {a['relative']:.2e}"
        for a in report.accuracy), ""]
    return "\n".join(lines)


def _quantize_int8(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], tmp: Path
                   ) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = tmp / "fp32.onnx"
    onnx.save(model, str(fp32))
    prepared = tmp / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    out = tmp / "int8.onnx"
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


def _write_manifest(directory: Path, io: _SliceIO, config: Config,
                    segments: list[dict[str, Any]], precision: str, chosen: str = "") -> None:
    manifest = {"version": FORMAT_VERSION, "model": io.name, "hardware": io.hardware,
                "precision": precision, "chosen": chosen, "session": config,
                "inputs": io.inputs, "outputs": io.outputs, "segments": segments}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _write_single(directory: Path, io: _SliceIO, model: onnx.ModelProto,
                  config: Config, precision: str, offline: bool) -> Path:
    """A candidate that is one ORT session; with `offline`, ONNX Runtime's own optimization
    for this machine is saved next to it and loaded with optimizations off."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "model.onnx"))
    segment: dict[str, Any] = {"type": "ort", "model": "model.onnx",
                               "inputs": [i["name"] for i in io.inputs],
                               "outputs": io.output_names}
    if offline:
        try:
            passes.ort_offline_optimize(directory / "model.onnx", directory / "model.ort.onnx",
                                        config.get("graph_level", "all"), config["threads"])
            segment["offline_model"] = "model.ort.onnx"
        except Exception:
            pass
    _write_manifest(directory, io, config, [segment], precision)
    return directory


def _add_custom_ops(run: _Run, offline: onnx.ModelProto) -> list[OpChoice]:
    """Generated kernels (Winograd, fused depthwise, channel scale, sparse direct convolution)
    as custom operators in ONNX Runtime's own saved graph (one session, no segments): the
    candidate "custom-ops", with the plain model kept beside it for machines where the
    kernels cannot run."""
    from wpk.optimizer import ort_ops

    job, config = run.job, run.config
    progress = job.progress
    kinds = ("nchwc_depthwise", "channel_scale", "direct", *ROW_KINDS) + \
        (("winograd",) if job.options.winograd else ())
    inside = select_custom_ops(job.model, offline, config, job.feeds[0],
                               job.output_names, on_op=lambda name: progress.advance(name),
                               time_left=job.left, kinds=kinds)
    if inside is None:
        return []
    directory = save_custom_ops(job.model, inside, run.tmp / "custom-ops", config)
    run.in_place = gain_breakdown.in_place_or_why_not(offline, inside.model, config,
                                                      job.feeds[0], job.output_names,
                                                      inside.library, job.left())
    counts = Counter(ort_ops.OP_TYPES[s.op] for s in inside.specs)
    if job.report.sparsity:
        job.report.sparsity["kernels"] = sum(1 for s in inside.specs
                                             if s.op in ort_ops.DIRECT_OPS)
    run.add("custom-ops", directory, "fp32", "ORT offline graph + custom operators ("
        + ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) + "), "
        + describe_session(config))
    return inside.choices


def save_custom_ops(model: onnx.ModelProto, inside: InsideOrt, out_dir: str | Path,
                    config: Config | None = None) -> Path:
    """Write an optimized directory whose one session runs ONNX Runtime's saved graph with
    `inside`'s custom operators; `model` (plain ONNX) is its fallback elsewhere."""
    from wpk.optimizer import ort_ops

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_dir / "model.onnx"))
    onnx.save(inside.model, str(out_dir / "model.wpk.onnx"))
    shutil.copyfile(inside.library, out_dir / ort_ops.LIBRARY_FILE)
    inputs, outputs = _io(model)
    segment = {"type": "ort", "model": "model.onnx", "offline_model": "model.wpk.onnx",
               "custom_ops": ort_ops.LIBRARY_FILE, "library_build": ort_ops.LIBRARY_BUILD,
               "library_target": ort_ops.library_target(inside.isa),
               "inputs": [i["name"] for i in inputs],
               "outputs": [o["name"] for o in outputs]}
    io = _SliceIO(model.graph.name, hardware_id(), inputs, outputs)
    _write_manifest(out_dir, io, config or dict(DEFAULT_SESSION), [segment], "fp32")
    return out_dir


def _add_openvino(run: _Run) -> None:
    """OpenVINO's CPU plugin compiling the whole slice: fp32 always (precision forced); bf16,
    fp16 and ORT's QDQ int8 model only when an accuracy budget allows lossy results."""
    from wpk.optimizer import openvino_backend as ovb

    job, tmp, config = run.job, run.tmp, run.config
    report = job.report
    reason = ovb.missing_reason()
    if reason:
        ovb.warn_once("optimize", f"OpenVINO candidates skipped: {reason}")
        report.candidates["openvino"] = {"skipped": reason}
        return
    variants = [("openvino", job.model, "fp32")]
    if job.options.accuracy_budget is not None:
        variants += [("openvino-bf16", job.model, "bf16"),
                     ("openvino-fp16", job.model, "fp16")]
        if (tmp / "int8" / "model.onnx").exists():
            variants.append(("openvino-int8", onnx.load(str(tmp / "int8" / "model.onnx")),
                             "int8"))
    # OpenVINO's own thread count, not ORT's tuned one (a noisy search may settle ORT on one
    # thread); `session` keeps ORT's configuration for the loader's fallback
    threads = os.cpu_count() or 1
    for key, model, precision in variants:
        hint = ovb.PRECISION_HINTS.get(precision, "f32")
        try:
            directory, segment = _write_openvino(tmp / key, job.io, model, config, precision,
                                                 hint, threads)
            crash = ovb.crash_reason(directory, segment)
            if crash:
                report.candidates[key] = {"error": crash}
                continue
            ovb.OpenVinoSegment(directory, segment)  # compile now, not in the guard
        except ovb.PrecisionMismatch as error:  # e.g. no bf16 on this CPU: nothing new
            report.candidates[key] = {"skipped": str(error)}
            continue
        except Exception as error:  # OpenVINO rejects some graphs: say so, go on
            report.candidates[key] = {"error": f"{type(error).__name__}: "
                                               f"{ovb.error_line(error)}"}
            continue
        run.add(key, directory, precision,
                f"OpenVINO CPU plugin, whole slice, {hint}"
                + (" on ORT's QDQ int8 model" if precision == "int8" else "")
                + f", t={threads}", settle_s=0.1)


def _write_openvino(directory: Path, io: _SliceIO, model: onnx.ModelProto,
                    config: Config, precision: str, hint: str, threads: int,
                    chosen: str = "") -> tuple[Path, dict[str, Any]]:
    """A candidate run by OpenVINO (the directory and its one segment); `session` keeps the
    ORT configuration, which the loader falls back to where OpenVINO is not installed."""
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "model.onnx"))
    segment = {"type": "openvino", "model": "model.onnx", "precision_hint": hint,
               "threads": int(threads),
               "inputs": [i["name"] for i in io.inputs], "outputs": io.output_names}
    _write_manifest(directory, io, config, [segment], precision, chosen)
    return directory, segment


def save_openvino(model: onnx.ModelProto | str | Path, out_dir: str | Path,
                  precision: str = "fp32", threads: int = 0) -> Path:
    """Write `model` as an optimized directory run by OpenVINO (tests, benchmarks, or to force
    OpenVINO without measuring); `wpk.optimizer.load` opens it like any other."""
    from wpk.optimizer.openvino_backend import PRECISION_HINTS

    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    if precision not in PRECISION_HINTS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISION_HINTS)}")
    inputs, outputs = _io(model)
    io = _SliceIO(model.graph.name, hardware_id(), inputs, outputs)
    out_dir, _ = _write_openvino(Path(out_dir), io, model, dict(DEFAULT_SESSION), precision,
                                 PRECISION_HINTS[precision], threads, chosen="openvino")
    return out_dir


def check_output_dir(out_dir: Path) -> None:
    """`out_dir` may be new, empty, or an earlier optimized directory (which is replaced):
    never a directory of other files, which installing would delete."""
    if out_dir.exists() and not out_dir.is_dir():
        raise WpkError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise WpkError(f"{out_dir}: holds other files (no {MANIFEST}): choose a new or empty "
                       f"directory for the optimized slice")


def _install(candidate: Path, out_dir: Path, chosen: str, kind: str) -> None:
    """Copy the chosen candidate's files into the output directory (replacing old ones); its
    manifest names the candidate (`chosen`) and its kind (`candidate_kind`)."""
    for stale in out_dir.iterdir():
        if stale.is_file() and (stale.suffix in (".onnx", ".npz", ".so") or stale.name == MANIFEST):
            stale.unlink()
    for path in candidate.iterdir():
        shutil.copy(path, out_dir / path.name)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    manifest["chosen"] = chosen
    manifest["candidate_kind"] = kind
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def save_segmented(model: onnx.ModelProto, specs: list, out_dir: str | Path,
                   config: Config | None = None) -> Path:
    """Write `model` as a segmented slice whose `specs` nodes run as generated kernels
    (used by per-operator selection, tests and benchmarks)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs, outputs = _io(model)
    segments = build_segments(model, specs, out_dir)
    io = _SliceIO(model.graph.name, hardware_id(), inputs, outputs)
    _write_manifest(out_dir, io, config or dict(DEFAULT_SESSION), segments, "fp32", "mixed")
    return out_dir
