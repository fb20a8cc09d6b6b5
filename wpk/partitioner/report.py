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
    tier each node was placed on, the bars below the bytes each cut tensor weighs."""
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
    fig, (ax, ax_bytes) = plt.subplots(2, 1, figsize=(max(8, min(24, n * 0.12)), 6.5),
                                       sharex=True, gridspec_kw={"height_ratios": [3, 1]})
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
