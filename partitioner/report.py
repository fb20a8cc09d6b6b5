"""`--report report.png`: per-layer cost on each tier, with the chosen cuts."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from wpk.errors import WpkError


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
        placed = chosen == t
        if placed.any():
            ax.axvspan(x[placed].min() - 0.5, x[placed].max() + 0.5, color=color, alpha=0.08)
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
    except OSError as error:
        raise WpkError(f"{path}: cannot write the report ({error.strerror})") from None
    finally:
        plt.close(fig)
