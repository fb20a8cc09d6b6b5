"""Where `--run auto` puts a tier's slice depends on the cores the process may use: its
affinity mask, capped by a cgroup v2 CPU quota."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from wpk.runtime.cpus import cgroup_cpu_quota, usable_cores


def _own_cgroup() -> str:
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    unified = [line[3:] for line in lines if line.startswith("0::")]
    if not unified:
        pytest.skip("no cgroup v2 entry for this process")
    return unified[0].lstrip("/")


@pytest.mark.parametrize("cpu_max, cpus", [("25000 100000\n", 0.25), ("250000 100000\n", 2.5),
                                           ("max 100000\n", None)])
def test_cgroup_cpu_quota_reads_this_process_cgroup(tmp_path, cpu_max, cpus):
    directory = tmp_path / _own_cgroup()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.max").write_text(cpu_max)
    assert cgroup_cpu_quota(tmp_path) == cpus


def test_no_cgroup_file_means_no_quota(tmp_path):
    _own_cgroup()
    assert cgroup_cpu_quota(tmp_path) is None


def test_usable_cores_never_exceed_the_affinity_mask():
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
