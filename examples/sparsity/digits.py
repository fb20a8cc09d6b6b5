"""Structured sparsity end to end on scikit-learn's bundled 8x8 digits (examples/sparsity).

  python examples/sparsity/digits.py [--out DIR] [--epochs N] [--finetune-epochs N]

1. train a small CNN with the CPU build of torch (dense accuracy on a held-out test set);
2. export it to ONNX and prune it with wpk-prune (2:4, and tile-wise 75 % for comparison),
   which measures the pruned accuracy on the test set without fine-tuning;
3. fine-tune in torch with the masks fixed (torch.nn.utils.prune.custom_from_mask), export
   again: the accuracy with fine-tuning;
4. wpk-prune --detect finds the pattern in the fine-tuned weights (however they got there);
5. wpk-partition and wpk-optimize the fine-tuned 2:4 model, and check that the optimized
   model's outputs equal ONNX Runtime's on it.

Needs torch (CPU) and scikit-learn, which wpk itself does not:
  pip install torch --index-url https://download.pytorch.org/whl/cpu scikit-learn
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

SEED = 0


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        sys.exit("this example trains on scikit-learn's bundled digits data: "
                 "pip install scikit-learn (and torch: pip install torch --index-url "
                 "https://download.pytorch.org/whl/cpu)")
    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, digits.target.astype(np.int64)


def make_net():
    import torch.nn as nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)     # 144 weights: first, kept dense
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)    # 4608, K = 144
            self.conv3 = nn.Conv2d(32, 64, 3, padding=1)    # 18432, K = 288
            self.fc1 = nn.Linear(64 * 2 * 2, 128)           # 32768, K = 256
            self.fc2 = nn.Linear(128, 10)                   # last, kept dense
            self.pool = nn.MaxPool2d(2)
            self.relu = nn.ReLU()

        def forward(self, x):
            x = self.relu(self.conv1(x))
            x = self.pool(self.relu(self.conv2(x)))
            x = self.pool(self.relu(self.conv3(x)))
            return self.fc2(self.relu(self.fc1(x.flatten(1))))

    return DigitsCNN()


def train(net, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt))
        for start in range(0, len(xt), 32):
            batch = order[start:start + 32]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[batch]), yt[batch]).backward()
            optimizer.step()
    net.eval()


def accuracy(net, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        return float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(net, path: Path) -> None:
    import torch

    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})


def run_tool(main, args: list[str], name: str) -> str:
    """Run a wpk command in this process; its stdout is returned (and its tables shown)."""
    print(f"$ {name} {' '.join(args)}", flush=True)
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(args)
    print(out.getvalue(), end="", flush=True)
    print(f"  ({name}: {time.perf_counter() - started:.1f} s)", flush=True)
    if code != 0:
        sys.exit(f"{name} failed (exit {code})")
    return out.getvalue()


def finetune_with_masks(net, pruned_onnx: Path, x, y, epochs: int) -> None:
    """Load wpk-prune's weights into `net` and train with their zeros fixed as masks."""
    import onnx
    import torch
    from onnx import numpy_helper
    from torch.nn.utils import prune

    weights = {t.name: numpy_helper.to_array(t)
               for t in onnx.load(str(pruned_onnx)).graph.initializer}
    masked = []
    for name, module in net.named_modules():
        key = f"{name}.weight"
        if key not in weights or not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        weight = torch.from_numpy(weights[key].copy())
        with torch.no_grad():
            module.weight.copy_(weight)
        if (weight == 0).any():
            prune.custom_from_mask(module, "weight", (weight != 0).float())
            masked.append(module)
    train(net, x, y, epochs, lr=3e-4, seed=SEED + 1)
    for module in masked:
        prune.remove(module, "weight")        # the zeros are now plain zeros in the weight


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="digits-sparsity", help="working folder")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        import torch
    except ImportError:
        sys.exit("this example trains with torch: pip install torch --index-url "
                 "https://download.pytorch.org/whl/cpu scikit-learn")
    import onnx
    import onnxruntime as ort

    from wpk.optimizer import load as load_optimized
    from wpk.optimizer import cli as optimize_cli
    from wpk.optimizer import prune_cli
    from wpk.optimizer.sparsity import detect
    from wpk.partitioner import cli as partition_cli

    # a small CNN: one thread is fastest (two were 40x slower on a busy 2-core machine)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = load_digits()
    order = np.random.default_rng(SEED).permutation(len(x))
    test, trainset = order[:360], order[360:]
    x_train, y_train, x_test, y_test = x[trainset], y[trainset], x[test], y[test]
    np.savez(out / "test.npz", x=x_test)
    np.save(out / "test_labels.npy", y_test)
    print(f"digits: {len(x_train)} training, {len(x_test)} test images (8x8)")

    torch.manual_seed(SEED)
    net = make_net()
    train(net, x_train, y_train, args.epochs, lr=1e-3, seed=SEED)
    print(f"  (training {args.epochs} epochs: {time.perf_counter() - started:.1f} s)")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    results = {"dense (torch)": accuracy(net, x_test, y_test)}
    print(f"dense accuracy (torch, test set): {results['dense (torch)']:.1%}")
    export(net, out / "dense.onnx")

    for pattern, ratio in (("2:4", None), ("tile:16", "0.75")):
        tag = pattern.replace(":", "_")
        pruned = out / f"pruned_{tag}.onnx"
        run_tool(prune_cli.main, ["--force", str(out / "dense.onnx"), "-o", str(pruned),
                                  "--pattern", pattern, *(["--ratio", ratio] if ratio else []),
                                  "--calibration-data", str(out / "test.npz"),
                                  "--labels", str(out / "test_labels.npy")], "wpk-prune")
        report = json.loads(pruned.with_suffix(".report.json").read_text())
        results[f"{pattern} pruned, no fine-tuning (wpk-prune, ONNX Runtime)"] = \
            report["accuracy"]["pruned"]
        net.load_state_dict(state)
        tuning = time.perf_counter()
        finetune_with_masks(net, pruned, x_train, y_train, args.finetune_epochs)
        print(f"  (fine-tuning {args.finetune_epochs} epochs: "
              f"{time.perf_counter() - tuning:.1f} s)")
        results[f"{pattern} fine-tuned under the masks (torch)"] = accuracy(net, x_test, y_test)
        tuned = out / f"finetuned_{tag}.onnx"
        export(net, tuned)
        print(f"{pattern}: accuracy without fine-tuning "
              f"{report['accuracy']['pruned']:.1%} (wpk-prune, ONNX Runtime), with "
              f"{args.finetune_epochs} epochs of fine-tuning under the masks "
              f"{results[f'{pattern} fine-tuned under the masks (torch)']:.1%} (torch)")
        run_tool(prune_cli.main, [str(tuned), "--detect"], "wpk-prune")
        found = {layer.weight: layer.summary for layer in detect(onnx.load(str(tuned)))}
        want = pattern if pattern == "2:4" else "tile:16"
        assert all(want in found[w] for w in ("conv2.weight", "conv3.weight", "fc1.weight")), found

    # the fine-tuned 2:4 model through wpk: ONNX Runtime on it, the partitioner, the optimizer
    tuned = out / "finetuned_2_4.onnx"
    session = ort.InferenceSession(str(tuned), providers=["CPUExecutionProvider"])
    reference = np.concatenate([session.run(None, {"x": x_test[i:i + 1]})[0]
                                for i in range(len(x_test))])
    results["2:4 fine-tuned (ONNX Runtime)"] = float((reference.argmax(1) == y_test).mean())
    tiers = Path(__file__).resolve().parents[1] / "one-machine.yaml"
    run_tool(partition_cli.main, ["--force", str(tuned), "--tiers-file", str(tiers),
                                  "--input-shape", "x=1x1x8x8", "-o", str(out / "plan")],
             "wpk-partition")
    optimized = out / "optimized_2_4"
    run_tool(optimize_cli.main, [str(tuned), "-o", str(optimized), "--input-shape", "x=1x1x8x8",
                                 "--budget-trials", "8", "--ops", "2", "--no-openvino",
                                 "--log", str(out / "tuning.jsonl"), "-q"], "wpk-optimize")
    fast = load_optimized(optimized)
    outputs = np.concatenate([fast.run(None, {"x": x_test[i:i + 1]})[0]
                              for i in range(len(x_test))])
    difference = float(np.abs(outputs - reference).max())
    same = float((outputs.argmax(1) == reference.argmax(1)).mean())
    results["2:4 wpk-optimized: max abs difference vs ONNX Runtime"] = difference
    results["2:4 wpk-optimized (wpk.optimizer.load)"] = float((outputs.argmax(1) == y_test).mean())
    print(f"optimized 2:4 model vs ONNX Runtime on the {len(x_test)} test images: max abs "
          f"difference {difference:.2e}, same top-1 on {same:.1%}, accuracy "
          f"{float((outputs.argmax(1) == y_test).mean()):.1%}")
    assert difference <= 1e-4 * max(1.0, float(np.abs(reference).max())), difference

    print("\nsummary (test set, 360 images):")
    for key, value in results.items():
        print(f"  {key:58s} {value:.1%}" if "difference" not in key else
              f"  {key:58s} {value:.2e}")
    print(f"took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
