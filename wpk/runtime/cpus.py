"""Pinning tiers to CPUs: `wpk-serve --cpus LIST`, `wpk-deploy --local --pin-cpus`.

Tiers on one machine otherwise share every CPU: the scheduler moves them between CPUs (their
caches go cold) and may run two busy tiers on the two hyperthreads of one core, where each
runs much slower. On the 16-core lent box the slices ran 0-37 % slower inside the tiers than
alone. A pinned tier runs on its own CPUs only; `split_cores` hands tiers whole physical
cores (both hyperthreads), so that no two tiers share one.

CPU lists use the kernel's own syntax (`taskset -c`, `/sys/.../cpulist`): "0-3,8,10-11".
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Sequence

from wpk.errors import WpkError
from wpk.plan import Plan

SYS_CPU = Path("/sys/devices/system/cpu")


MAX_CPU = 65535   # above any kernel's CPU count: a larger number is a typo, not a CPU
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def parse_cpu_list(text: str) -> frozenset[int]:
    """"0-3,8" -> {0, 1, 2, 3, 8}; ValueError saying what is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        match = _RANGE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"{text!r} is not a CPU list like 0-3,8")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValueError(f"{text!r}: {part.strip()} runs backwards")
        if high > MAX_CPU:
            raise ValueError(f"{text!r}: CPU {high} is beyond any machine's (0-{MAX_CPU})")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Sequence[int] | frozenset[int] | set[int]) -> str:
    """{0, 1, 2, 3, 8} -> "0-3,8"."""
    ranges: list[str] = []
    ordered = sorted(cpus)
    start = previous = None
    for cpu in [*ordered, None]:
        if start is not None and cpu != previous + 1:
            ranges.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = None
        if cpu is not None and start is None:
            start = cpu
        previous = cpu
    return ",".join(ranges)


def available_cpus() -> frozenset[int]:
    """CPUs this process may run on (its affinity: taskset, a cpuset)."""
    return frozenset(os.sched_getaffinity(0))


def physical_cores(cpus: frozenset[int] | set[int], sys_cpu: Path = SYS_CPU
                   ) -> list[list[int]]:
    """`cpus` grouped by the physical core they belong to (the kernel's list of a CPU's
    hyperthread siblings), in CPU order; a CPU whose topology is not readable is a core of
    its own."""
    cores: dict[str, list[int]] = {}
    for cpu in sorted(cpus):
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        key = f"cpu{cpu}"
        for name in ("core_cpus_list", "thread_siblings_list"):   # newer name, older name
            try:
                key = (topology / name).read_text().strip()
                break
            except OSError:
                continue
        cores.setdefault(key, []).append(cpu)
    return list(cores.values())


def split_cores(weights: Sequence[float], cpus: frozenset[int] | set[int],
                sys_cpu: Path = SYS_CPU) -> list[frozenset[int]]:
    """One CPU set per weight, disjoint, about proportional to the weights (each tier's
    predicted compute): whole physical cores while there are at least as many cores as
    weights, else single CPUs taken core after core (so some tiers then share a core's
    hyperthreads). WpkError when there are fewer CPUs than weights."""
    units = physical_cores(cpus, sys_cpu)
    if len(units) < len(weights):   # single CPUs, core after core: runs of them stay within
        units = [[cpu] for core in units for cpu in core]   # a core where they can
    if len(units) < len(weights):
        raise WpkError(f"pinning {len(weights)} tiers needs {len(weights)} CPUs; this process "
                       f"may use {len(units)} ({format_cpu_list(cpus)})")
    counts = _apportion([max(float(w), 0.0) for w in weights], len(units))
    sets, start = [], 0
    for count in counts:
        sets.append(frozenset(cpu for unit in units[start:start + count] for cpu in unit))
        start += count
    return sets


def split_for_plan(plan: Plan) -> list[frozenset[int]]:
    """This process's CPUs split among `plan`'s tiers (split_cores), about in proportion to
    each tier's predicted compute on its planned hardware; a tier predicted to compute
    nothing still gets its share of one (its event loop runs there)."""
    return split_cores([max(t.predicted_compute_ms, 1e-3) for t in plan.tiers],
                       available_cpus())


def _apportion(weights: list[float], total: int) -> list[int]:
    """`total` units shared by `weights`: at least one each, the rest by largest remainder."""
    counts = [1] * len(weights)
    spare = total - len(weights)
    mass = sum(weights)
    shares = [(w / mass if mass else 1 / len(weights)) * spare for w in weights]
    for index, share in enumerate(shares):
        counts[index] += int(share)
    left = total - sum(counts)
    by_remainder = sorted(range(len(weights)), key=lambda i: shares[i] - int(shares[i]),
                          reverse=True)
    for index in by_remainder[:left]:
        counts[index] += 1
    return counts


def pin_process(cpus: frozenset[int]) -> None:
    """Move every thread of this process onto `cpus` (threads started later inherit it);
    WpkError naming the CPUs this process may not use."""
    allowed = available_cpus()
    missing = sorted(set(cpus) - allowed)
    if missing:
        raise WpkError(f"--cpus {format_cpu_list(cpus)}: CPU {format_cpu_list(missing)} is "
                       f"not available here (this process may use {format_cpu_list(allowed)})")
    os.sched_setaffinity(0, cpus)
    pinned: set[str] = set()
    while True:   # e.g. numpy's BLAS threads, already started; again for any they started
        tasks = set(os.listdir("/proc/self/task")) - pinned
        if not tasks:
            return
        for task in tasks:
            try:
                os.sched_setaffinity(int(task), cpus)
            except (ProcessLookupError, PermissionError):
                pass   # a thread that ended meanwhile
        pinned |= tasks


def cpu_list(text: str) -> frozenset[int]:
    """An argparse type: a CPU list (see parse_cpu_list)."""
    import argparse

    try:
        return parse_cpu_list(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def usable_cores() -> int:
    """Cores this process may use: its affinity mask (taskset, a cpuset), capped by a cgroup v2
    CPU quota (`docker --cpus`, Kubernetes limits), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return min(cores, math.ceil(quota)) if quota else cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup v2 `cpu.max` allows (None: no quota, or no
    cgroup v2)."""
    try:
        line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines()
                    if x.startswith("0::"))
        quota, period = (root / line[3:].lstrip("/") / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, StopIteration, ValueError):
        return None
