"""`--report report.png`: per-layer cost on each tier, with the chosen cuts."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from wpk.errors import WpkError


def report_path(text: str) -> Path:
    """The file `--report` names, checked before any work: not a directory, and in a format
    matplotlib writes (no suffix means PNG)."""
    path = Path(text)
    if path.is_dir():
        raise WpkError(f"--report {text}: is a directory; name the image to write, e.g. "
                       f"{path / 'report.png'}")
    path = path if path.suffix else path.with_suffix(".png")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise WpkError("--report needs matplotlib: pip install 'wpk[plot]'") from None
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise WpkError(f"--report {text}: matplotlib cannot write {path.suffix} files (it "
                       f"writes {', '.join(sorted(formats))})")
    return path


def draw_report(result, path: Path) -> None:
    """Node times per tier (log scale) in topological order; the background shows the
    tier each node was placed on, the bars below the bytes each cut tensor weighs. With
    leakage figures (measured or given), a third row shows what each node's output gives
    away, and a panel beside them the latency / leakage front of the device's cut."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise WpkError("--report needs matplotlib: pip install 'wpk[plot]'") from None
    problem, tiers = result.problem, result.tiers
    chosen = result.best.evaluation.tiers
    n = problem.n_nodes
    x = np.arange(n)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = _layout(plt, n, result.leakage is not None)
    ax, ax_bytes = axes["time"], axes["bytes"]
    for t, tier in enumerate(tiers.tiers):
        color = colors[t % len(colors)]
        ax.plot(x, problem.node_ms[:, t], marker=".", lw=1, color=color,
                label=f"{tier.name} ({result.best.machines[t].source})")
    for start, stop, t in _runs(chosen):    # parallel branches may interleave tiers
        ax.axvspan(start - 0.5, stop - 0.5, color=colors[t % len(colors)], alpha=0.08)
    cuts = [i for i in range(1, n) if chosen[i] != chosen[i - 1]]
    for c in cuts:
        ax.axvline(c - 0.5, color="black", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_ylabel("node time (ms)")
    ax.set_title(f"{result.graph.name}: {result.objective} plan, predicted "
                 f"{result.plan.predicted['latency_ms']:.2f} ms end to end")
    ax.legend(loc="upper right", fontsize=8)
    out_bytes = np.zeros(n)
    for tensor in problem.tensors:
        if tensor.producer >= 0:
            out_bytes[tensor.producer] += tensor.nbytes
    ax_bytes.bar(x, out_bytes / 1e3, color="gray")
    for c in cuts:
        ax_bytes.axvline(c - 0.5, color="black", ls="--", lw=1)
    ax_bytes.set_yscale("log")
    ax_bytes.set_ylabel("output KB")
    ax_bytes.set_xlabel("node (topological order)")
    if result.leakage is not None:
        ax_bytes.set_xlabel("")
        _draw_leakage(axes["leakage"], result, cuts)
        _draw_front(axes["front"], result)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as error:  # ValueError: a format matplotlib cannot write
        reason = error.strerror if isinstance(error, OSError) else str(error).split(" (")[0]
        raise WpkError(f"{path}: cannot write the report ({reason})") from None
    finally:
        plt.close(fig)


def _runs(tiers: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, tier) of each run of consecutive nodes on one tier."""
    runs, start = [], 0
    for i in range(1, len(tiers) + 1):
        if i == len(tiers) or tiers[i] != tiers[start]:
            runs.append((start, i, int(tiers[start])))
            start = i
    return runs


def _layout(plt, n: int, with_leakage: bool):
    """The figure and its axes by name: time and bytes, then leakage and the front."""
    width = max(8, min(24, n * 0.12))
    if not with_leakage:
        fig, (time_ax, bytes_ax) = plt.subplots(2, 1, figsize=(width, 6.5), sharex=True,
                                                gridspec_kw={"height_ratios": [3, 1]})
        return fig, {"time": time_ax, "bytes": bytes_ax}
    fig = plt.figure(figsize=(width + 4, 9))
    grid = fig.add_gridspec(3, 2, width_ratios=[width, 4], height_ratios=[3, 1, 2])
    time_ax = fig.add_subplot(grid[0, 0])
    axes = {"time": time_ax, "bytes": fig.add_subplot(grid[1, 0], sharex=time_ax),
            "leakage": fig.add_subplot(grid[2, 0], sharex=time_ax),
            "front": fig.add_subplot(grid[:, 1])}
    return fig, axes


def _draw_leakage(ax, result, cuts: list[int]) -> None:
    """Per node, the leakage of its output (the tensor a cut right after it sends): dCor
    with its 95 % band, and the reconstruction's PSNR on a second axis; tensors the plan
    sends off the device in red."""
    report, graph = result.leakage, result.graph
    crossing = set(result.best.evaluation.forward_tensors[0]
                   if result.best.evaluation.forward_tensors else [])
    xs, dcor, low, high, psnr, sent = [], [], [], [], [], []
    for index, node in enumerate(graph.nodes):
        figures = [report.tensors[o] for o in node.outputs if o in report.tensors]
        if not figures:
            continue
        worst = max(figures, key=lambda t: t.dcor)
        xs.append(index)
        dcor.append(worst.dcor)
        low.append(worst.dcor - worst.dcor_low)
        high.append(worst.dcor_high - worst.dcor)
        psnr.append(min(max(t.psnr_db for t in figures), 60.0))
        sent.append(any(t.tensor in crossing for t in figures))
    ax.errorbar(xs, dcor, yerr=[np.maximum(low, 0), np.maximum(high, 0)], fmt=".",
                color="tab:purple", ecolor="tab:purple", alpha=0.7, lw=0.8, label="dCor")
    ax.scatter([x for x, s in zip(xs, sent) if s], [d for d, s in zip(dcor, sent) if s],
               color="red", zorder=3, label="sent off the device")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("dCor with the input")
    twin = ax.twinx()
    twin.plot(xs, psnr, color="tab:green", lw=1, alpha=0.8, label="PSNR (dB)")
    twin.set_ylabel(f"reconstruction PSNR dB ({report.attack})")
    twin.yaxis.get_major_formatter().set_useOffset(False)
    for c in cuts:
        ax.axvline(c - 0.5, color="black", ls="--", lw=1)
    label = "synthetic inputs" if report.synthetic else Path(report.source).name
    ax.set_title(f"leakage of each node's output ({report.samples} samples, {label})",
                 fontsize=9)
    ax.set_xlabel("node (topological order)")
    handles = ax.get_legend_handles_labels()
    twin_handles = twin.get_legend_handles_labels()
    ax.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], loc="upper right",
              fontsize=8)


def _draw_front(ax, result) -> None:
    """End-to-end latency against the most-leaking tensor sent off the device: each point
    the fastest plan that leaks less than the one before (exact min-cuts), the plan
    written as a star."""
    from wpk.partitioner import leakage_plan

    metric = result.leakage_metric
    front = result.leakage_front or leakage_plan.front(result.problem, result.leakage, metric)
    shown = [(ms, 0.0 if worst is None else worst) for ms, worst, _ in front]
    if shown:
        ax.plot([p[0] for p in shown], [p[1] for p in shown], marker="o", color="tab:blue",
                drawstyle="steps-post", label="fastest plan per leakage level")
    crossing = result.best.evaluation.forward_tensors[0] \
        if result.best.evaluation.forward_tensors else []
    mine = max((result.leakage.tensors[t].value(metric) for t in crossing
                if t in result.leakage.tensors), default=0.0)
    ax.scatter([result.best.evaluation.latency_ms], [mine], marker="*", s=180, color="red",
               zorder=3, label="this plan")
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel(f"highest {metric} sent off the device (0: nothing sent)")
    ax.set_title("latency / leakage", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
