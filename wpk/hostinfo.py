"""What machine a measurement was taken on: CPU model, cores, memory, GPU, OS.

Best effort and dependency-free (works on a Raspberry Pi or a Jetson as on a server): every
probe that fails leaves its field out instead of failing the measurement.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's marketing name ('Intel(R) Xeon(R) ...', 'Cortex-A72', ...)."""
    cpuinfo = _read("/proc/cpuinfo")
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        for line in cpuinfo.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], text=True,
                                  capture_output=True, timeout=2).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def physical_cores() -> int:
    """Physical cores (what ONNX Runtime uses for its default intra-op thread count)."""
    cores = set()
    physical = "0"
    for line in _read("/proc/cpuinfo").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "physical id":
            physical = value.strip()
        elif name.strip() == "core id":
            cores.add((physical, value.strip()))
    logical = os.cpu_count() or 1
    return min(len(cores), logical) if cores else logical


def memory_mb() -> int | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        return None


def gpu_names() -> list[str]:
    """NVIDIA GPUs via nvidia-smi; on a Jetson (no nvidia-smi GPU list) the board's model."""
    if shutil.which("nvidia-smi"):
        try:
            result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                    text=True, capture_output=True, timeout=5)
            names = [line.strip() for line in result.stdout.splitlines() if line.strip()]
            if result.returncode == 0 and names:
                return names
        except (OSError, subprocess.SubprocessError):
            pass
    board = _read("/proc/device-tree/model").strip("\x00\n ")
    if "jetson" in board.lower() or "nvidia" in board.lower():
        return [board]
    return []


def host_info() -> dict[str, Any]:
    """The `device.host` object of a profile."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count() or 1,
        "physical_cores": physical_cores(),
    }
    memory = memory_mb()
    if memory is not None:
        info["memory_mb"] = memory
    board = _read("/proc/device-tree/model").strip("\x00\n ")
    if board:
        info["board"] = board
    gpus = gpu_names()
    if gpus:
        info["gpus"] = gpus
    return info
