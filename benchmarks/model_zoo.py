"""Every stage of wpk on every model of the conformance corpus, with its outcome in a table.

    python benchmarks/model_zoo.py [--torch] [--only NAME,...] [--stages partition,profile,...]
                                   [--markdown docs/measurements/DATE-model-zoo.md]

Stages, each `ok`, `refused` (a one-line error a user can act on) or `FAILED` (a traceback,
a wrong answer, a slowdown):
1. partition: `wpk-partition` for 2 and 3 tiers and each objective (a verified plan).
2. profile: `wpk-profile`; the node times add up to the whole-model median within 10 %.
3. optimize: `wpk-optimize` lossless (fp32, bounded budget); outputs within tolerance, and
   the optimized model timed against ONNX Runtime's defaults, interleaved in one run.
4. deploy: the 3-tier plan served by `wpk-deploy --local`; tritonclient's answers equal
   ONNX Runtime on the whole model.
The CLIs run in this process through their `main`, exactly as the console scripts do: a
`WpkError` is their one-line refusal (exit 2), any other exception is a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.zoo_corpus import MissingModel, ZooModel, corpus  # noqa: E402

STAGES = ("partition", "profile", "optimize", "deploy")
OBJECTIVES = ("latency", "throughput", "bandwidth")
TIER_SETS = ("device,edge", "device,edge,cloud")
# the slowdown the optimizer may show against ORT's defaults before it counts as slower:
# both are timed interleaved in one run, and 2 cores shared with the rest of the machine
# move a single median by a few per cent
NOISE = 0.05
# the optimizer's bounded budget per model (CI lowers it)
OPTIMIZE_TRIALS = 8
OPTIMIZE_SECONDS = 60
# a slowdown fails the optimize stage in the benchmark; the tests check correctness alone
# (timings on a shared CI machine are no verdict)
CHECK_SPEED = True


@dataclass
class Outcome:
    status: str                 # ok | refused | FAILED | skipped
    detail: str = ""

    def cell(self) -> str:
        return self.status if not self.detail else f"{self.status}: {self.detail}"


@dataclass
class Row:
    model: ZooModel
    path: Path | None = None
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.status in ("ok", "refused", "skipped") for o in self.outcomes.values())


def run_cli(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    """A CLI's exit code and its error line; a traceback becomes exit code -1."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            code = main(argv)
    except SystemExit as stop:  # argparse
        code = int(stop.code or 0)
    except Exception:  # the very thing this corpus looks for: any traceback is a failure
        return -1, traceback.format_exc(limit=-3).strip().splitlines()[-1]
    lines = [line for line in stderr.getvalue().splitlines() if line.startswith("wpk: error")]
    return code, lines[-1].removeprefix("wpk: error: ") if lines else ""


def _refusal_or_failure(code: int, message: str, what: str) -> Outcome:
    if code == 2 and message and "\n" not in message:
        return Outcome("refused", message)
    return Outcome("FAILED", f"{what}: exit {code}: {message}")


def stage_partition(row: Row, work: Path) -> Outcome:
    from wpk.partitioner.cli import main

    shapes = [a for s in row.model.shape_args() for a in ("--input-shape", s)]
    done, refusals = [], []
    for tiers in TIER_SETS:
        bound: list[str] = []
        for objective in OBJECTIVES:   # latency first: its plan bounds the bandwidth search
            out = work / f"plan-{len(tiers.split(','))}-{objective}"
            code, message = run_cli(main, [str(row.path), "--tiers", tiers, "--objective",
                                           objective, "-o", str(out), "--no-calibrate",
                                           *shapes, *(bound if objective == "bandwidth"
                                                      else [])])
            if objective == "latency" and code == 0:
                latency = json.loads((out / "plan.json").read_text())["predicted"]["latency_ms"]
                bound = ["--max-latency-ms", f"{1.5 * latency:.3f}"]
            if code == 0 and (out / "plan.json").is_file():
                done.append(f"{len(tiers.split(','))}/{objective}")
                continue
            outcome = _refusal_or_failure(code, message, f"{tiers} {objective}")
            if outcome.status == "FAILED":
                return outcome
            refusals.append(outcome.detail)
    if refusals and not done:
        return Outcome("refused", refusals[0])
    if refusals:
        return Outcome("FAILED", f"refused only some objectives: {refusals[0]}")
    plan = json.loads((work / "plan-3-latency" / "plan.json").read_text())
    used = "+".join(t["name"] for t in plan["tiers"] if t.get("slice"))
    return Outcome("ok", f"6 plans verified; latency plan runs on {used}")


def stage_profile(row: Row, work: Path) -> Outcome:
    from wpk.profile_cli import main

    out = work / "profile.json"
    shapes = [a for s in row.model.shape_args() for a in ("--input-shape", s)]
    code, message = run_cli(main, [str(row.path), "-o", str(out), "-q", "--runs", "10",
                                   "--warmup", "3", *shapes])
    if code != 0:
        return _refusal_or_failure(code, message, "wpk-profile")
    document = json.loads(out.read_text())
    median = document["total_ms"]["median"]
    nodes = sum(n["ms"] for n in document["nodes"])
    off = abs(nodes - median) / median if median else 0.0
    status = "ok" if off <= 0.10 else "FAILED"
    return Outcome(status, f"{len(document['nodes'])} nodes sum to {nodes:.2f} ms, "
                           f"median {median:.2f} ms ({100 * off:.1f} % apart)")


def stage_optimize(row: Row, work: Path) -> Outcome:
    from wpk.optimizer.cli import main

    out = work / "optimized"
    shapes = [a for s in row.model.shape_args() for a in ("--input-shape", s)]
    budget = ["--budget-trials", str(OPTIMIZE_TRIALS), "--budget-seconds", str(OPTIMIZE_SECONDS)]
    code, message = run_cli(main, [str(row.path), "-o", str(out), *budget, "--ops", "2", "-q",
                                   *shapes])
    if code != 0:
        return _refusal_or_failure(code, message, "wpk-optimize")
    report = json.loads((out / "report.json").read_text())
    ratio, worst = _side_by_side(row, out)
    chosen = report["chosen"]
    if worst > 1e-3:
        return Outcome("FAILED", f"{chosen}: outputs differ by {worst:.3g} relative")
    if CHECK_SPEED and ratio < 1 - NOISE:
        return Outcome("FAILED", f"{chosen}: {ratio:.2f}x ORT defaults (slower)")
    return Outcome("ok", f"{chosen}, {ratio:.2f}x ORT defaults (interleaved)")


def _side_by_side(row: Row, optimized_dir: Path, rounds: int = 7) -> tuple[float, float]:
    """Speed-up of the optimized model over ORT's defaults on the whole model, timed in
    alternating rounds, and the worst relative output difference."""
    import onnxruntime as ort

    import wpk.optimizer
    from wpk.graph import Graph
    from wpk.profiling import random_inputs

    graph = Graph.load(row.path, row.model.input_shapes)
    feeds = random_inputs(graph)
    default = ort.InferenceSession(str(row.path), providers=["CPUExecutionProvider"])
    tuned = wpk.optimizer.load(optimized_dir)
    names = [o.name for o in default.get_outputs()]
    expected = default.run(names, feeds)
    got = tuned.run(names, feeds)
    worst = max(float(np.max(np.abs(g.astype(np.float64) - e), initial=0.0)
                      / max(float(np.max(np.abs(e), initial=0.0)), 1e-12))
                for g, e in zip(got, expected) if e.dtype.kind == "f")
    repeats = max(1, int(0.2 / max(_seconds(lambda: default.run(names, feeds)), 1e-4)))
    times: dict[str, list[float]] = {"default": [], "tuned": []}
    for _ in range(rounds):
        for label, session in (("default", default), ("tuned", tuned)):
            start = time.perf_counter()
            for _ in range(repeats):
                session.run(names, feeds)
            times[label].append((time.perf_counter() - start) / repeats)
    return float(np.median(times["default"]) / np.median(times["tuned"])), worst


def _seconds(call: Callable[[], object]) -> float:
    call()
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def stage_deploy(row: Row, work: Path) -> Outcome:
    import onnxruntime as ort
    import tritonclient.grpc as triton

    from wpk.deploy.local import LocalDeployment
    from wpk.errors import WpkError
    from wpk.graph import Graph
    from wpk.partitioner.slicing import random_inputs
    from wpk.plan import load_plan

    plan_dir = work / "plan-3-latency"
    if not (plan_dir / "plan.json").is_file():
        return Outcome("skipped", "no 3-tier plan")
    plan = load_plan(plan_dir)
    graph = Graph.load(row.path, row.model.input_shapes)
    feeds = random_inputs(graph, seed=7)
    whole = ort.InferenceSession(str(row.path), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in whole.get_outputs()], whole.run(None, feeds)))
    try:
        with LocalDeployment(plan_dir, port=_free_port(), threads=1) as deployment:
            client = triton.InferenceServerClient(deployment.entry)
            inputs = []
            for name, array in feeds.items():
                tensor = triton.InferInput(name, list(array.shape),
                                           triton.np_to_triton_dtype(array.dtype))
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            result = client.infer(plan.name, inputs, client_timeout=120)
    except WpkError as error:   # the plan was verified: a tier that cannot serve it is a bug
        return Outcome("FAILED", f"a verified plan did not serve: {error}")
    worst = 0.0
    for name, value in expected.items():
        got = result.as_numpy(name)
        if got is None or got.shape != value.shape:
            return Outcome("FAILED", f"output {name!r}: {None if got is None else got.shape}")
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - value), initial=0.0)))
        if not np.allclose(got, value, rtol=1e-3, atol=1e-4):
            return Outcome("FAILED", f"output {name!r} differs by {worst:.3g}")
    tiers = "+".join(t.tier for t in deployment.tiers)
    return Outcome("ok", f"{tiers}: tritonclient = ORT (max abs diff {worst:.2g})")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


STAGE_FUNCTIONS = {"partition": stage_partition, "profile": stage_profile,
                   "optimize": stage_optimize, "deploy": stage_deploy}


def run_model(model: ZooModel, work: Path, stages: tuple[str, ...] = STAGES) -> Row:
    row = Row(model)
    work.mkdir(parents=True, exist_ok=True)
    try:
        row.path = model.make(work / "model")
    except MissingModel as missing:
        row.outcomes = {s: Outcome("skipped", str(missing)) for s in stages}
        return row
    except Exception:  # a variant the corpus could not build: its own failure, not wpk's
        line = traceback.format_exc(limit=-1).strip().splitlines()[-1]
        row.outcomes = {s: Outcome("FAILED", f"building the model: {line}") for s in stages}
        return row
    for stage in stages:
        start = time.perf_counter()
        try:
            outcome = STAGE_FUNCTIONS[stage](row, work)
        except Exception:
            outcome = Outcome("FAILED", traceback.format_exc(limit=-2).strip().splitlines()[-1])
        outcome.detail += f" [{time.perf_counter() - start:.0f} s]"
        row.outcomes[stage] = outcome
    return row


def markdown(rows: list[Row], stages: tuple[str, ...], title: str) -> str:
    lines = [f"## {title}", "", "| model | group | " + " | ".join(stages) + " |",
             "| --- | --- | " + " | ".join("---" for _ in stages) + " |"]
    for row in rows:
        cells = [row.outcomes[s].cell().replace("|", "/") for s in stages]
        name = row.model.name + (f" ({row.model.note})" if row.model.note else "")
        lines.append(f"| {name} | {row.model.group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine_line() -> str:
    import onnxruntime as ort

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{time.strftime('%Y-%m-%d')}, {cpu} x{os.cpu_count()}, Python "
            f"{platform.python_version()}, ONNX Runtime {ort.__version__}, commit {commit}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", action="store_true",
                        help="also export and run the torch/torchvision/transformers models")
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--markdown", help="write the table(s) to this file")
    args = parser.parse_args()
    stages = tuple(s for s in args.stages.split(",") if s)
    models = corpus()
    if args.torch:
        from benchmarks.zoo_torch import torch_corpus
        models += torch_corpus()
    if args.only:
        wanted = set(args.only.split(","))
        models = [m for m in models if m.name in wanted]
    rows: list[Row] = []
    measured = machine_line()   # the commit the run starts from, not the one it ends at
    with tempfile.TemporaryDirectory(prefix="wpk-zoo-") as scratch:
        for model in models:
            row = run_model(model, Path(scratch) / model.name, stages)
            rows.append(row)
            print(f"{model.name}: " + "; ".join(f"{s} {row.outcomes[s].cell()}"
                                              for s in stages), flush=True)
            if args.markdown:   # after every model: a long run stopped early keeps its rows
                _write_markdown(Path(args.markdown), rows, stages, measured)
    failed = [r.model.name for r in rows if not r.ok]
    summary = f"{len(rows) - len(failed)} passed, {len(failed)} failed"
    print(summary if not failed else f"{summary}: {', '.join(failed)}")
    return 1 if failed else 0


def _write_markdown(path: Path, rows: list[Row], stages: tuple[str, ...],
                    measured: str) -> None:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.model.group, []).append(row)
    text = [f"Measured {measured}; command: `python benchmarks/model_zoo.py "
            f"{' '.join(sys.argv[1:])}`.", ""]
    text += [markdown(members, stages, group) for group, members in groups.items()]
    path.write_text("\n".join(text))


if __name__ == "__main__":
    raise SystemExit(main())
