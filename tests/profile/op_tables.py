"""Hand-written latency tables for tests: known curves, so that predictions are exact."""
from __future__ import annotations

import json
from pathlib import Path

FAMILIES_BY_BYTES = ("binary", "act-Relu", "batchnorm", "copy-Concat", "copy-Transpose",
                     "maxpool", "avgpool", "reduce", "softmax", "layernorm", "reorder")


def power_law_table(name: str = "box", gflops: float = 50.0, gbytes: float = 10.0,
                    node_us: float = 2.0, run_us: float = 20.0, nchwc_block: int = 0,
                    families: tuple[str, ...] = ("conv-k1", "conv-k3", "depthwise-k3", "gemm",
                                                 "matmul") + FAMILIES_BY_BYTES,
                    scale: float = 1.0) -> dict:
    """A table whose every family follows time = work / rate exactly: FLOPs at `gflops`
    for compute families, bytes at `gbytes` for the others (points a decade apart)."""
    entries = []
    for family in families:
        compute = family.split("-")[0] in ("conv", "depthwise", "grouped", "gemm", "matmul")
        for exponent in range(4, 10):
            flops = 10.0 ** exponent
            for intensity in (5, 20, 80) if compute else (10,):   # bytes vary on their own
                nbytes = flops / intensity
                ms = flops / gflops / 1e6 if compute else nbytes / gbytes / 1e6
                entries.append({"case": f"{family} {exponent} {intensity}", "op_type": "X",
                                "family": family, "flops": flops, "bytes": nbytes, "ms": ms})
    return {"version": 1, "kind": "op-table",
            "device": {"name": name, "provider": "CPUExecutionProvider", "threads": 1},
            "overhead_ms": {"run": run_us / 1000, "node": node_us / 1000},
            "layout": {"nchwc_block": nchwc_block}, "calibration": {"scale": scale},
            "entries": entries}


def write_table(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path
