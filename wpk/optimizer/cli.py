"""wpk-optimize: tune a plan's slices (or one model) for this machine.

  wpk-optimize PLAN_DIR --tier edge        optimize one tier's slice, set its `optimized`
  wpk-optimize PLAN_DIR --all-local        every tier of the plan, measured on this machine
  wpk-optimize model.onnx -o DIR           one model
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from wpk import settings
from wpk import cli_args
from wpk.console import make_console
from wpk.errors import WpkError, cli_entry, one_line_warnings
from wpk.files import check_outputs, read_text, writable_file
from wpk.graph import fixed_shapes, parse_input_shapes
from wpk.optimizer import calibration, pipeline
from wpk.optimizer.search import STRATEGIES

OPTIMIZED_DIR = "optimized"


class RichProgress(pipeline.Progress):
    def __init__(self, progress: Progress, label: str):
        self.progress, self.label, self.task = progress, label, None

    def phase(self, name: str, total: int | None = None) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.progress.tasks[-1].total or 0)
        self.task = self.progress.add_task(f"{self.label}: {name}", total=total or 1)

    def advance(self, text: str = "") -> None:
        if self.task is not None:
            self.progress.advance(self.task)


def _parser() -> argparse.ArgumentParser:
    parser = cli_args.documented_parser("wpk-optimize", __doc__)
    parser.add_argument("target", help="plan directory (from wpk-partition) or an .onnx model")
    parser.add_argument("-o", "--output", help="output directory (model mode)")
    parser.add_argument("--tier", action="append", default=[],
                        help="tier of the plan to optimize (repeatable)")
    parser.add_argument("--all-local", action="store_true",
                        help="optimize every tier of the plan on this machine")
    parser.add_argument("--budget-trials", type=cli_args.positive_int, default=48,
                        help="measurements per slice across all searches (default 48)")
    parser.add_argument("--budget-seconds", type=cli_args.positive_float, default=None,
                        help="wall-clock bound per slice for the searches")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="ga")
    parser.add_argument("--accuracy-budget", type=float, default=None, metavar="REL",
                        help="allow lossy precision (int8; bf16/fp16 with OpenVINO) up to this "
                             "relative output error, "
                             "e.g. 0.02; default: fp32 only")
    parser.add_argument("--ops", type=cli_args.non_negative_int, default=6,
                        help="heaviest operators to try generated kernels on (0: none)")
    parser.add_argument("--calibration-data", metavar="FILE",
                        help="real input samples for int8 calibration and the accuracy guard: "
                             + calibration.DATA_FILES_HELP)
    parser.add_argument("--no-openvino", action="store_true",
                        help="do not try OpenVINO's CPU plugin as a candidate")
    parser.add_argument("--no-winograd", action="store_true",
                        help="do not try Winograd kernels on 3x3 stride-1 convolutions")
    parser.add_argument("--samples", type=cli_args.positive_int, default=3,
                        help="sample inputs for the guard")
    parser.add_argument("--log", default=str(settings.tuning_log()),
                        help="tuning log (JSON lines; default $WPK_TUNING_LOG, else "
                             "~/.cache/wpk/tuning.jsonl)")
    parser.add_argument("--seed", type=cli_args.non_negative_int, default=0)
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                        help="fix a dynamic input dimension of a model file (repeatable); the "
                             "optimized model takes that shape")
    parser.add_argument("--profile", metavar="FILE",
                        help="model file only: also write a wpk-profile file of the optimized "
                             "model as it runs here (its generated kernels' times on the "
                             "model's own nodes), for wpk-partition --profile TIER=FILE")
    parser.add_argument("-q", "--quiet", action="store_true")
    return parser


class Target(NamedTuple):
    """One slice to optimize: its label, ONNX file, output directory and tier (None for a
    model file)."""
    label: str
    path: Path
    out: Path
    tier: str | None


@dataclass(frozen=True)
class OptimizeJob:
    """One wpk-optimize run, read from its flags once (`from_args`) and handed down: what
    to optimize and where to write it, the pipeline's options, the inputs' shapes."""
    target: Path                       # the plan (directory or plan.json) or the model file
    targets: list[Target]
    options: pipeline.Options
    input_shapes: dict[str, tuple[int, ...]]
    calibration_data: str | None
    quiet: bool = False
    profile: Path | None = None       # a profile of the optimized model to write (model mode)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OptimizeJob":
        """The parsed flags, checked before any tuning (WpkError naming the flag): the
        accuracy budget, the tuning log, the targets and their output directories."""
        if args.accuracy_budget is not None and not 0 < args.accuracy_budget < 1:
            raise WpkError("--accuracy-budget is a relative error in (0, 1), e.g. 0.02")
        _check_log(Path(args.log))
        options = pipeline.Options(
            strategy=args.strategy,
            budget=pipeline.Budget(args.budget_trials, args.budget_seconds),
            accuracy_budget=args.accuracy_budget, per_operator=args.ops > 0,
            operator_limit=max(args.ops, 1), samples=args.samples, log_path=args.log,
            seed=args.seed, openvino=not args.no_openvino,
            winograd=not args.no_winograd)
        targets = _targets(args)
        shapes = parse_input_shapes(args.input_shape)
        if shapes and not _is_model_file(Path(args.target)):
            raise WpkError("--input-shape is for a model file; a plan's slices have fixed "
                           "shapes")
        for target in targets:   # before any tuning: never someone's files
            pipeline.check_output_dir(target.out)
        profile = Path(args.profile) if args.profile else None
        if profile is not None:
            if not _is_model_file(Path(args.target)):
                raise WpkError("--profile is for a model file; profile a plan's tiers with "
                               "wpk-profile on each tier's machine")
            check_outputs([profile], [args.target], force=True)
        return cls(Path(args.target), targets, options, shapes, args.calibration_data,
                   args.quiet, profile)

    @property
    def from_plan(self) -> bool:
        """Whether the targets are tiers of a plan (not a model file)."""
        return not _is_model_file(self.target)


def _is_model_file(target: Path) -> bool:
    return target.is_file() and target.suffix == ".onnx"


def _targets(args: argparse.Namespace) -> list[Target]:
    """Each slice the flags name: a model file's, or the plan's tiers'."""
    target = Path(args.target)
    if not target.exists():
        raise WpkError(f"{target}: no such file or directory")
    if _is_model_file(target):
        if args.tier or args.all_local:
            raise WpkError("--tier/--all-local need a plan directory, not a model file")
        out = Path(args.output) if args.output else target.with_suffix("")
        if out.exists() and out.is_file():
            raise WpkError(f"{out}: exists and is a file")
        return [Target(target.stem, target, out, None)]
    from wpk.plan import load_plan, slice_path

    if args.output:
        raise WpkError(f"-o/--output is for a model file; a plan's tiers are written to "
                       f"{target if target.is_dir() else target.parent}/{OPTIMIZED_DIR}/TIER")
    plan = load_plan(target)
    base = target if target.is_dir() else target.parent
    if args.all_local and args.tier:
        raise WpkError("--tier and --all-local: give one or the other")
    if args.all_local:
        tiers = [t for t in plan.tiers if t.slice]
    elif args.tier:
        tiers = [plan.tier(name) for name in dict.fromkeys(args.tier)]   # each once
    else:
        raise WpkError(f"{target}: name a tier with --tier NAME or use --all-local "
                       f"(tiers: {', '.join(t.name for t in plan.tiers)})")
    out = []
    for tier in tiers:
        if not tier.slice:
            raise WpkError(f"tier {tier.name!r} has no slice to optimize")
        out.append(Target(tier.name, slice_path(base, tier), base / OPTIMIZED_DIR / tier.name,
                          tier.name))
    return out


def _warnings_to(console: Console):
    """The optimizer's own warnings (OpenVINO skipped or replaced) as one line each."""
    from wpk.optimizer.openvino_backend import OpenVinoWarning

    return one_line_warnings(OpenVinoWarning, lambda message: console.print(
        f"[yellow]wpk: warning:[/] {escape(message)}", soft_wrap=True))


def _calibration(job: OptimizeJob) -> dict[str, calibration.Calibration]:
    """Each target's calibration samples: the file's arrays for a model; for a plan, the
    whole model's inputs carried through the earlier tiers' slices to each tier's inputs."""
    data, targets = job.calibration_data, job.targets
    if not data:
        return {}
    if not job.from_plan:
        label, path, _out, _tier = targets[0]
        return {label: calibration.load(data, calibration.model_inputs(path))}
    from wpk.plan import load_plan

    target = job.target
    per_tier = calibration.for_plan(load_plan(target), target if target.is_dir() else
                                    target.parent, data, tiers=[t.tier for t in targets])
    return {label: calibration.split(per_tier[tier], f"{data} (through the "
                                                     f"slices before tier {tier!r})")
            for label, _path, _out, tier in targets if tier in per_tier}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _summary(console: Console, label: str, report: pipeline.Report) -> None:
    table = Table(title=f"{label}: chose {report.chosen} ({report.speedup:.2f}x)",
                  title_justify="left")
    for column in ("candidate", "precision", "ms", "default ms", "speedup (95 % interval)",
                   "max rel. error", "kept?", "what"):
        table.add_column(column)
    for key, cand in report.candidates.items():
        if "error" in cand or "skipped" in cand:
            table.add_row(key, "", "", "", "", "", "failed" if "error" in cand else "skipped",
                          escape(cand.get("error") or cand["skipped"]))
            continue
        rel = max((a["relative"] for a in cand["accuracy"]), default=0.0)
        table.add_row(key, cand["precision"], _ms(cand.get("ms")), _ms(cand.get("default_ms")),
                      pipeline.speedup_cell(cand), f"{rel:.2e}", "yes" if cand["within_budget"] else "over budget",
                      escape(cand["describe"]))
    console.print(table)
    if report.operators:
        ops_table = Table(title="per-operator selection", title_justify="left")
        for column in ("node", "op", "ORT ms", "ours ms", "chosen"):
            ops_table.add_column(column)
        for op in report.operators:
            ops_table.add_row(escape(short_node_name(op["node"])), op["op"], f"{op['ort_ms']:.3f}",
                              f"{op['kernel_ms']:.3f}", op["chosen"])
        console.print(ops_table)
    if report.sparsity:
        kernels = report.sparsity.get("kernels", 0)
        console.print(f"[bold]{label}[/]: sparsity in the weights: {report.sparsity['line']}; "
                      f"candidate custom-ops runs {kernels} of them with sparse kernels")
    console.print(f"[bold]{label}[/]: {report.reason}")


def short_node_name(name: str, width: int = 48) -> str:
    """A fused site's name is its nodes' names joined by "+" (hundreds of characters for a
    torch export): the table shows the first node's name, its end kept, and how many more
    nodes the site holds (report.json keeps the full names)."""
    first, *rest = name.split("+")
    shown = first if len(first) <= width else "…" + first[-(width - 1):]
    return f"{shown} (+{len(rest)})" if rest else shown


@cli_entry
def main(argv: list[str] | None = None) -> int:
    job = OptimizeJob.from_args(_parser().parse_args(argv))
    console = make_console(stderr=True, quiet=job.quiet)
    with _warnings_to(console):          # restores warnings.showwarning for in-process callers
        return _optimize_targets(job, console)


def _optimize_targets(job: OptimizeJob, console: Console) -> int:
    targets, shapes, options = job.targets, job.input_shapes, job.options
    per_target = _calibration(job)   # checked before any tuning starts
    if options.accuracy_budget is not None:
        for label, data in per_target.items():
            if not data.held_out:
                console.print(f"[yellow]wpk: warning:[/] {escape(label)}: "
                              f"{len(data.calibration)} calibration samples (fewer than "
                              f"{calibration.HOLD_OUT_FROM}): the accuracy guard measures int8 "
                              f"on the samples it was calibrated on, none held out",
                              soft_wrap=True)
    reports = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False,
                  disable=job.quiet) as progress:
        for label, path, out, tier in targets:
            source = fixed_shapes(path, shapes, label) if shapes else path
            reports.append(pipeline.optimize(
                source, out, dataclasses.replace(options, calibration_data=per_target.get(label)),
                RichProgress(progress, label), name=label))
            if tier:  # recorded at once: a later tier failing keeps this one's work
                _record_optimized(job.target, tier)
    for (label, _path, out, _tier), report in zip(targets, reports):
        _summary(console, label, report)
    for (label, _path, out, _tier), report in zip(targets, reports):
        print(f"{label}: {out} ({report.chosen}, {report.speedup:.2f}x vs ONNX Runtime "
              f"defaults)")
    if job.profile is not None:
        _write_profile(job, console)
    return 0


def _write_profile(job: OptimizeJob, console: Console) -> None:
    """The optimized model's per-node times here, as a wpk-profile file."""
    from wpk.optimizer.slice_profile import profile_optimized
    from wpk.profile_format import save_profile

    label, path, out, _tier = job.targets[0]
    document = profile_optimized(path, out, input_shapes=job.input_shapes or None,
                                 progress=not job.quiet and sys.stderr.isatty())
    save_profile(document, job.profile)
    print(f"{label}: profile {job.profile} ({document['total_ms']['median']:.3f} ms here, "
          f"ran {document['ran']['model']})")


def _check_log(path: Path) -> None:
    """The tuning log must be readable text (if it exists) and writable, before any tuning."""
    if path.exists():
        read_text(path, "tuning log")
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise WpkError(f"{path}: cannot create the tuning log's directory "
                           f"({error.strerror})") from None
    writable_file(path, "tuning log")


def _record_optimized(target: Path, tier: str) -> None:
    """Point the plan's `tier` at its optimized directory (the runtime loads it from there)."""
    from wpk.plan import load_plan

    plan = load_plan(target)
    plan.tier(tier).optimized = f"{OPTIMIZED_DIR}/{tier}"
    plan.save(target if target.is_dir() else target.parent)


if __name__ == "__main__":
    sys.exit(main())
