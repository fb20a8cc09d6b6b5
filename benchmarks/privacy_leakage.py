"""How much of the input each cut of a real model leaks, on real images; what a bound costs.

The PP-OCR v4 text detector shipped in `rapidocr-onnxruntime` on crops of scikit-image's
sample images (random crops, flips and brightness, normalized as PP-OCR does): the leakage
figures of every candidate cut tensor (`wpk.partitioner.leakage`), a plot of leakage against
cut position, reconstructions of a shallow and a deep cut, and the latency of plans under
tighter `--max-leakage dcor=` bounds (planned at 640x640 with the figures from the crops).
Optional dependencies (a separate venv): rapidocr-onnxruntime, scikit-image, matplotlib.

    python benchmarks/privacy_leakage.py [--samples 320] [--size 64] [--out docs/images]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
IMAGES = ("astronaut", "camera", "chelsea", "coffee", "coins", "page", "text", "rocket",
          "immunohistochemistry", "moon", "horse", "brick", "grass", "gravel", "logo", "clock")


def detector_path() -> Path:
    import rapidocr_onnxruntime

    found = sorted(Path(rapidocr_onnxruntime.__file__).parent.rglob("*det*.onnx"))
    if not found:
        sys.exit("no text detector .onnx inside rapidocr_onnxruntime")
    return found[0]


def source_images() -> list[np.ndarray]:
    """scikit-image's bundled samples as HxWx3 floats in [0, 1] (ones needing a download are
    skipped)."""
    from skimage import data

    images = []
    for name in IMAGES:
        try:
            image = np.asarray(getattr(data, name)(), dtype=np.float32)
        except Exception:  # a sample that needs the network here
            continue
        image = image / (255.0 if image.max() > 1.5 else 1.0)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        images.append(image[..., :3])
    return images


def crops(images: list[np.ndarray], n: int, size: int, seed: int = 0) -> np.ndarray:
    """[n, 3, size, size] random crops (scale 1-4x the size), flipped, brightness-jittered,
    normalized with PP-OCR's mean and std."""
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        image = images[i % len(images)]
        side = int(min(rng.uniform(1, 4) * size, *image.shape[:2]))
        y = rng.integers(0, image.shape[0] - side + 1)
        x = rng.integers(0, image.shape[1] - side + 1)
        crop = resize(image[y:y + side, x:x + side], (size, size), anti_aliasing=True)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop * rng.uniform(0.8, 1.2), 0, 1)
        out[i] = (crop.transpose(2, 0, 1) - MEAN) / STD
    return out


def plot_leakage(report, graph, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying = _input_dependent(graph)
    rows = [(graph.producer.get(name, -1) + 1, t) for name, t in report.tensors.items()
            if name in varying]
    x = np.array([r[0] for r in rows])
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.fill_between(x, [t.dcor_low for _, t in rows], [t.dcor_high for _, t in rows],
                    color="tab:blue", alpha=0.25, step="mid", label="dCor 95% band")
    ax.plot(x, [t.dcor for _, t in rows], ".", color="tab:blue", ms=3, label="dCor")
    ax.set_xlabel("cut position (producer node, topological order; constants left out)")
    ax.set_ylabel("distance correlation with the input")
    ax.set_ylim(0, 1.05)
    right = ax.twinx()
    right.plot(x, [min(t.psnr_db, 60) for _, t in rows], ".", color="tab:red", ms=3)
    right.set_ylabel("ridge reconstruction PSNR (dB)", color="tab:red")
    ax.set_title(f"PP-OCRv4 text detector: leakage per candidate cut tensor "
                 f"({report.samples} crops)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _input_dependent(graph) -> set[str]:
    """Tensors computed from the input (the rest are constants: they leak nothing)."""
    found = set(graph.inputs)
    for node in graph.nodes:
        if any(t in found for t in node.inputs):
            found.update(node.outputs)
    return found


def plot_reconstructions(graph, samples, names: list[str], path: Path, count: int = 5,
                         learned: bool = False, steps: int = 300) -> None:
    """Held-out crops and their reconstructions from each tensor of `names`: by the ridge
    decoder, or with `learned` by the convolutional one (`--attack conv`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from wpk.partitioner import leakage

    attack = leakage.Attack.of(graph, samples)
    shape = (len(attack.test),) + attack.image
    rebuilt: dict[str, np.ndarray] = {}
    if learned:
        from wpk.partitioner.leakage_decoder import conv_reconstruct

        def keep(name, features):
            values = features.reshape((len(features),) + graph.tensors[name].shape[1:])
            rebuilt[name] = conv_reconstruct(values, attack.inputs, attack.image,
                                             attack.train, attack.test, steps)
        leakage.fetch_grams(graph, samples, names, on_features=keep)
    else:
        grams = leakage.fetch_grams(graph, samples, names)
        rebuilt = {name: attack.reconstruct(grams[name]) for name in names}
    rows = [("input", attack.inputs[attack.test].reshape(shape))] + [
        (name, rebuilt[name].reshape(shape)) for name in names]
    fig, axes = plt.subplots(len(rows), count, figsize=(1.8 * count, 1.9 * len(rows)))
    for r, (label, images) in enumerate(rows):
        for c in range(count):
            picture = np.clip((images[c] * STD + MEAN).transpose(1, 2, 0), 0, 1)
            axes[r, c].imshow(picture)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(f"held-out crops and their {'learned (conv)' if learned else 'ridge'} "
                 f"reconstructions from a cut tensor", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bound_table(model: Path, report, bounds: list[float], link: str) -> list[dict]:
    """Latency of the device/edge plan (640x640 input) under each dCor bound."""
    from wpk.errors import WpkError
    from wpk.partitioner.api import partition

    rows = []
    for bound in [None] + bounds:
        try:
            result = partition(model, ["device", "edge"], links=[link],
                               input_shapes={"x": (1, 3, 640, 640)}, use_calibration=False,
                               verify=False, leakage=report,
                               max_leakage=None if bound is None else f"dcor={bound}")
        except WpkError as error:
            rows.append({"bound": bound, "error": str(error)})
            continue
        used = result.plan.links[0] if result.plan.links else None
        crossing = (used.leakage or {}) if used else {}
        rows.append({"link": link, "bound": bound, "latency_ms": result.plan.predicted["latency_ms"],
                     "device_nodes": len(result.plan.tiers[0].nodes),
                     "tensors": list(crossing),
                     "max_dcor": max((f["dcor"] for f in crossing.values()), default=None),
                     "max_psnr_db": max((f["psnr_db"] for f in crossing.values()), default=None),
                     "bytes": used.bytes if used else 0})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=320)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=30, help="bootstrap replicates")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--conv", type=int, default=8, metavar="K",
                        help="train the learned decoder on K feature maps (needs torch; 0: no)")
    parser.add_argument("--decoder-steps", type=int, default=300)
    args = parser.parse_args()
    missing = _missing(("rapidocr_onnxruntime", "skimage", "matplotlib"))
    if missing:
        print(f"skipped: needs {', '.join(missing)} (pip install rapidocr-onnxruntime "
              f"scikit-image matplotlib)")
        return 0
    from wpk.graph import Graph
    from wpk.partitioner import leakage

    model = detector_path()
    graph = Graph.load(model, {"x": (1, 3, args.size, args.size)})
    samples = {"x": crops(source_images(), args.samples, args.size)[:, None]}
    start = time.perf_counter()
    report = leakage.measure(graph, samples, f"scikit-image crops {args.size}px",
                             reps=args.reps, progress=lambda s: print(s, file=sys.stderr))
    print(f"{sum(n in _input_dependent(graph) for n in report.tensors)} of them computed "
          f"from the input")
    print(f"model {model.name}: {len(graph.nodes)} nodes, {len(report.tensors)} candidate "
          f"tensors, {args.samples} samples, measured in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"report": report.to_json()}, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    plot_leakage(report, graph, args.out / "privacy-leakage-ppocr-det.png")
    names = list(report.tensors)
    first_reader = graph.nodes[graph.consumers[graph.inputs[0]][0]]
    shallow, deep = first_reader.outputs[0], _deepest_feature(graph, report)
    plot_reconstructions(graph, samples, [shallow, deep],
                         args.out / "privacy-reconstruction-ppocr-det.png")
    for name in [names[0], shallow, deep]:
        t = report.tensors[name]
        print(f"{name}: dCor {t.dcor:.3f} [{t.dcor_low:.2f}, {t.dcor_high:.2f}] "
              f"PSNR {t.psnr_db:.1f} dB SSIM {t.ssim:.3f}")
    rows = [row for link in ("device-edge=1gbit,2ms", "device-edge=100mbit,5ms")
            for row in bound_table(model, report, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], link)]
    for row in rows:
        print(json.dumps(row), flush=True)
    draw_plan_report(model, report, args.out / "privacy-report-ppocr-det.png",
                     "device-edge=100mbit,5ms", 0.5)
    compared = conv_comparison(graph, samples, report, args.conv, args.decoder_steps) \
        if args.conv and not _missing(("torch",)) else []
    if compared:
        plot_reconstructions(graph, samples, [shallow, compared[1]["tensor"], deep],
                             args.out / "privacy-reconstruction-conv-ppocr-det.png",
                             learned=True, steps=args.decoder_steps)
    for row in compared:
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"report": report.to_json(), "bounds": rows,
                                         "conv": compared}, indent=1))
    return 0


def conv_comparison(graph, samples, report, count: int, steps: int) -> list[dict]:
    """The learned decoder (`--attack conv`) beside ridge on `count` feature maps spread
    along the network (the shallowest and the deepest included)."""
    from wpk.partitioner import leakage

    varying = _input_dependent(graph)
    maps = [n for n, t in report.tensors.items() if n in varying and len(t.shape) == 4
            and n not in graph.inputs]
    picks = sorted({maps[round(i * (len(maps) - 1) / max(count - 1, 1))]
                    for i in range(count)}, key=maps.index)
    attack = leakage.Attack.of(graph, samples)
    learned: dict[str, tuple[float, float, float]] = {}

    def learn(name, features):
        started = time.perf_counter()
        psnr, ssim = attack.learned_scores(features, tuple(graph.tensors[name].shape), steps)
        learned[name] = (psnr, ssim, time.perf_counter() - started)
        print(f"{name}: conv decoder {psnr:.1f} dB in {learned[name][2]:.0f} s",
              file=sys.stderr, flush=True)

    leakage.fetch_grams(graph, samples, picks, on_features=learn)
    rows = []
    for name in picks:
        t = report.tensors[name]
        rows.append({"tensor": name, "position": graph.producer.get(name, -1) + 1,
                     "shape": list(t.shape), "dcor": t.dcor, "ridge_psnr_db": t.psnr_db,
                     "ridge_ssim": t.ssim, "conv_psnr_db": learned[name][0],
                     "conv_ssim": learned[name][1], "conv_seconds": learned[name][2]})
    return rows


def draw_plan_report(model: Path, report, path: Path, link: str, bound: float | None) -> None:
    """`wpk-partition --report` for the 640x640 device/edge plan with these figures."""
    from wpk.partitioner.api import partition
    from wpk.partitioner.report import draw_report

    result = partition(model, ["device", "edge"], links=[link],
                       input_shapes={"x": (1, 3, 640, 640)}, use_calibration=False,
                       verify=False, leakage=report, with_front=True,
                       max_leakage=None if bound is None else f"dcor={bound}")
    draw_report(result, path)


def _missing(modules: tuple[str, ...]) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def _deepest_feature(graph, report) -> str:
    """The backbone's last tensor at 1/32 of the input: the deepest before the FPN upsamples."""
    size = graph.tensors[graph.inputs[0]].shape[-1] // 32
    deep = [n for n, t in report.tensors.items() if len(t.shape) == 4 and t.shape[-1] == size]
    return deep[-1] if deep else list(report.tensors)[-1]


if __name__ == "__main__":
    sys.exit(main())
