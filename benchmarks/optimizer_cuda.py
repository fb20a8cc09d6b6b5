"""Generated CUDA kernels vs. PyTorch (cuDNN / cuBLAS) on ResNet, MobileNet and MLP layer
shapes: every schedule of the CUDA space is run and checked, the fastest is reported.
Needs a CUDA GPU with pycuda (or CuPy) and PyTorch; exits with a message elsewhere.

    python benchmarks/optimizer_cuda.py
"""
from __future__ import annotations

import json
import sys

import numpy as np

from wpk.optimizer import codegen_cuda, ops
from wpk.optimizer.build import pycuda_available

CASES = {
    "resnet conv3x3 64x56x56": (lambda: ops.conv2d(1, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, relu=True), "conv", dict(stride=1, padding=1, groups=1)),
    "resnet stem 7x7s2 3x224": (lambda: ops.conv2d(1, 3, 224, 224, 32, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1), "conv", dict(stride=2, padding=3, groups=1)),
    "mobilenet dw3x3 144x56x56": (lambda: ops.conv2d(1, 144, 56, 56, 144, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 144), "conv", dict(stride=1, padding=1, groups=144)),
    "mobilenet pw1x1 96->24 56x56": (lambda: ops.conv2d(1, 96, 56, 56, 24, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1), "conv", dict(stride=1, padding=0, groups=1)),
    "mlp gemm 1x2048x2048": (lambda: ops.gemm(1, 2048, 2048, False, True, bias="row", relu=True), "gemm", {}),
    "maxpool 3x3s2 32x112x112": (lambda: ops.pool2d("max", 1, 32, 112, 112, 3, 3, (2, 2), (1, 1, 1, 1)), "pool", {}),
}


def main() -> int:
    try:
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
    except Exception as error:
        print(f"optimizer_cuda: skipped ({type(error).__name__}: {error}); needs a GPU + torch")
        return 0
    # full fp32 on both sides: PyTorch's cuDNN convolutions default to TF32 on Ampere and later
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    ok, why = pycuda_available()
    print("pycuda:", "yes" if ok else why + " (using CuPy)")
    rng = np.random.default_rng(0)
    for name, (make, kind, kw) in CASES.items():
        comp = make()
        arrays = ops.random_buffers(comp, rng)
        t = [torch.from_numpy(a).cuda() for a in arrays]
        if kind == "conv":
            fn = (lambda: torch.relu(torch.nn.functional.conv2d(t[0], t[1], t[2], **kw))) \
                if comp.epilogue else (lambda: torch.nn.functional.conv2d(t[0], t[1], t[2], **kw))
        elif kind == "gemm":
            fn = lambda: torch.relu(torch.nn.functional.linear(t[0], t[1], t[2]))  # noqa: E731
        else:
            fn = lambda: torch.nn.functional.max_pool2d(t[0], 3, 2, 1)  # noqa: E731
        ref = fn().cpu().numpy()
        for _ in range(10):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            fn()
        end.record()
        end.synchronize()
        torch_ms = start.elapsed_time(end) / 200
        best, matches = (float("inf"), None), True
        for config in codegen_cuda.cuda_space():
            out, ms = codegen_cuda.run_on_gpu(comp, config, [a.copy() for a in arrays], repeats=100)
            matches &= bool(np.allclose(out, ref, rtol=1e-3, atol=1e-3))
            best = min(best, (ms, config), key=lambda item: item[0])
        print(json.dumps({"op": name, "torch_ms": round(torch_ms, 4), "ours_ms": round(best[0], 4),
                          "speedup": round(torch_ms / best[0], 2), "best": best[1],
                          "all_schedules_match": matches}), flush=True)
    print(torch.cuda.get_device_name())
    return 0


if __name__ == "__main__":
    sys.exit(main())
