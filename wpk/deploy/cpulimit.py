"""Slow a process down to a fraction of one CPU with a cgroup CPU quota: an emulated device.

Every tier of an emulation runs on this machine's CPU; to make the device tier as slow as a
small board (and plans made for such a device meaningful), its server runs in a cgroup whose
CFS quota is `fraction` of one CPU per short period (2 ms, so a 10 ms layer is slowed evenly
rather than run at full speed and then frozen). Works with cgroup v2 (`cpu.max`) and v1
(`cpu.cfs_quota_us`). The group is removed by `close()`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from wpk.errors import WpkError

PERIOD_US = 2000


def _cpu_root() -> tuple[Path, int]:
    """(directory under which to make groups, cgroup version)."""
    unified = Path("/sys/fs/cgroup")
    if (unified / "cgroup.controllers").exists():
        if "cpu" not in (unified / "cgroup.controllers").read_text().split():
            raise WpkError("cgroup v2 without the cpu controller: cannot limit CPU")
        return unified, 2
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            return Path(fields[1]), 1
    raise WpkError("no cgroup cpu controller mounted: cannot limit CPU")


class CpuLimit:
    """A cgroup allowing `fraction` of one CPU; `add(pid)` moves a process into it."""

    def __init__(self, name: str, fraction: float):
        if not 0.01 <= fraction <= 64:
            raise WpkError(f"CPU fraction must be between 0.01 and 64, got {fraction}")
        root, self.version = _cpu_root()
        self.path = root / name
        self.fraction = fraction
        try:
            self.path.mkdir()
        except FileExistsError:
            pass
        except OSError as error:
            raise WpkError(f"cannot create cgroup {self.path}: {error.strerror}") from None
        quota = max(1000, int(PERIOD_US * fraction))  # the kernel's minimum quota is 1 ms
        period = PERIOD_US if quota == int(PERIOD_US * fraction) else int(quota / fraction)
        if self.version == 2:
            (self.path / "cpu.max").write_text(f"{quota} {period}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        """Remove the group (its processes must have exited; waits for them briefly)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
