"""Keep idle CPUs quick to wake while tiers serve: a PM QoS CPU-latency request.

Every hop between tiers wakes a process that sleeps waiting for its socket, and a sleeping
CPU first leaves its idle state: on a 2-core KVM guest (cpuidle driver haltpoll) that costs
35-40 us per wake-up, measured with a TCP ping-pong between two processes pinned to different
CPUs (77 us per round trip; 10 us with the limit below; 8 us on one CPU). A server's deep
C-states take longer still.

Linux keeps every CPU in idle states that wake within N microseconds for as long as some
process holds /dev/cpu_dma_latency open with N written to it (0: the CPUs poll when idle,
the quickest and the most power-hungry). The request ends when the file is closed, by us or
by the kernel when the process exits: nothing outlives the tier. Writing it needs root (or
write access to the device), so this is an option (`wpk-serve --cpu-latency-us`,
`wpk-deploy --local --cpu-latency-us`), never a default: a battery-powered device pays for
it in power.
"""
from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Iterator

from wpk.errors import WpkError

DEVICE = Path("/dev/cpu_dma_latency")
_VALUE = struct.Struct("=i")   # the kernel reads and writes the limit as a native s32
MAX_US = 2_000_000_000         # the kernel's own "no limit"


class CpuLatencyLimit:
    """Holds a wake-up latency limit of `microseconds` until `close()` (or the process ends)."""

    def __init__(self, microseconds: int, device: Path = DEVICE):
        if not 0 <= microseconds <= MAX_US:
            raise WpkError(f"--cpu-latency-us {microseconds}: expected 0 to {MAX_US} "
                           f"(microseconds an idle CPU may take to wake)")
        self.microseconds = microseconds
        self.device = device
        try:
            self._fd: int | None = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as error:
            raise WpkError(f"--cpu-latency-us: cannot open {device} ({error.strerror}); "
                           f"it needs Linux and root or write access to it") from None
        try:
            os.write(self._fd, _VALUE.pack(microseconds))
        except OSError as error:
            self.close()
            raise WpkError(f"--cpu-latency-us: {device} refused the limit "
                           f"({error.strerror})") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "CpuLatencyLimit":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def cpu_latency_limit(microseconds: int | None, device: Path = DEVICE) -> Iterator[None]:
    """Hold the limit for the `with` block; None: hold none."""
    if microseconds is None:
        yield
        return
    with CpuLatencyLimit(microseconds, device):
        yield


def current_limit(device: Path = DEVICE) -> int | None:
    """The limit in force on this machine now (the lowest any process holds; MAX_US when
    none), or None where it cannot be read."""
    try:
        with open(device, "rb") as file:
            return _VALUE.unpack(file.read(_VALUE.size))[0]
    except (OSError, struct.error):
        return None
