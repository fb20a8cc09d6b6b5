"""What machine a measurement was taken on: CPU model, cores, memory, GPU, OS.

Best effort and dependency-free (works on a Raspberry Pi or a Jetson as on a server): every
probe that fails leaves its field out instead of failing the measurement.
"""
from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
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


def _cpuinfo_model_name() -> str | None:
    """The first `model name` line of /proc/cpuinfo (None where there is none)."""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() if ":" in line else ""
    return None


@dataclass(frozen=True)
class MachineFacts:
    """The one set of facts that every identity of this machine is derived from.

    Two string formats are stored on disk and must keep matching what earlier versions
    wrote, so both are kept, each derived from these facts:
    - `hardware_id()`: the optimizer's tuning logs and reports ('<cpu> x<cores> ort<ver>');
    - `calibration_key()`: the partitioner's efficiency cache ('<machine>|<processor>|...').
    A profile's `device.host` (`host_info`) takes its machine and core count from here too.
    """

    machine: str                 # platform.machine(): 'x86_64', 'aarch64', ...
    processor: str               # platform.processor() (often empty on Linux)
    cpuinfo_model_name: str | None  # /proc/cpuinfo's 'model name', where the kernel has one
    logical_cores: int | None    # os.cpu_count()
    onnxruntime: str             # onnxruntime.__version__

    @property
    def cpu(self) -> str:
        """The CPU name the hardware id uses: cpuinfo's model name, else what platform says."""
        if self.cpuinfo_model_name is not None:
            return self.cpuinfo_model_name
        return self.processor or self.machine

    def hardware_id(self) -> str:
        """A short fingerprint: CPU model, logical cores, onnxruntime version."""
        return f"{self.cpu} x{self.logical_cores} ort{self.onnxruntime}"

    def calibration_key(self) -> str:
        """The key the partitioner's calibration cache is stored under."""
        return f"{self.machine}|{self.processor}|{self.logical_cores}|{self.onnxruntime}"


@functools.lru_cache(maxsize=1)
def machine_facts() -> MachineFacts:
    """This machine's facts, read once per process."""
    import onnxruntime

    return MachineFacts(platform.machine(), platform.processor(), _cpuinfo_model_name(),
                        os.cpu_count(), onnxruntime.__version__)


def host_info() -> dict[str, Any]:
    """The `device.host` object of a profile."""
    facts = machine_facts()
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": facts.machine,
        "cpu": cpu_model(),
        "logical_cores": facts.logical_cores or 1,
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
