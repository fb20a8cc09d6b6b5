"""Pinning tiers to CPUs: CPU lists, splitting whole physical cores among tiers, and tiers that
really run where they were put (every thread of the process)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wpk.deploy.local import LocalDeployment
from wpk.errors import WpkError
from wpk.runtime.cpus import (available_cpus, format_cpu_list, parse_cpu_list,
                              physical_cores, split_cores)

from .conftest import deploy_table


@pytest.mark.parametrize("text, cpus", [
    ("0", {0}), ("0-3,8", {0, 1, 2, 3, 8}), ("2,0-1", {0, 1, 2}), ("4-4", {4})])
def test_cpu_lists_read_and_write_the_kernel_syntax(text, cpus):
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus
    assert format_cpu_list({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"


@pytest.mark.parametrize("text, message", [
    ("", "is not a CPU list"), ("a", "is not a CPU list"), ("1-", "is not a CPU list"),
    ("\u00b2", "is not a CPU list"), ("3-1", "3-1 runs backwards"),
    ("0-4000000000", "CPU 4000000000 is beyond any machine's")])
def test_bad_cpu_lists_say_why(text, message):
    with pytest.raises(ValueError, match=message):
        parse_cpu_list(text)


def fake_topology(root: Path, cores: int, threads_per_core: int) -> frozenset[int]:
    """/sys/devices/system/cpu as Linux numbers hyperthreads: CPU c and c + cores share a
    core."""
    cpus = range(cores * threads_per_core)
    for cpu in cpus:
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        siblings = format_cpu_list({cpu % cores + cores * t for t in range(threads_per_core)})
        (topology / "thread_siblings_list").write_text(siblings + "\n")
    return frozenset(cpus)


def shares_no_core(tier_cpus: frozenset[int], cores: int) -> bool:
    """Every core `tier_cpus` touches is wholly in it (with the fake topology)."""
    return all({cpu % cores, cpu % cores + cores} <= tier_cpus for cpu in tier_cpus)


def test_tiers_get_whole_cores_in_proportion_to_their_compute(tmp_path):
    cpus = fake_topology(tmp_path, cores=8, threads_per_core=2)
    assert physical_cores(cpus, tmp_path)[0] == [0, 8]
    sets = split_cores([4.0, 2.0, 1.0], cpus, tmp_path)
    assert [len(s) for s in sets] == [8, 4, 4]  # cores 4 + 2 + 2, two hyperthreads each
    assert set().union(*sets) == cpus and sum(map(len, sets)) == len(cpus)  # disjoint
    assert all(shares_no_core(tier_cpus, 8) for tier_cpus in sets)


def test_fewer_cores_than_tiers_split_cores_last_and_fewer_cpus_is_an_error(tmp_path):
    cpus = fake_topology(tmp_path, cores=2, threads_per_core=2)
    sets = split_cores([1, 1, 1], cpus, tmp_path)
    assert sets == [frozenset({0, 2}), frozenset({1}), frozenset({3})]  # one core kept whole
    with pytest.raises(WpkError, match="pinning 5 tiers needs 5 CPUs; this process may use 4"):
        split_cores([1] * 5, cpus, tmp_path)
    # unreadable topology: every CPU is a core of its own
    assert physical_cores({0, 1}, tmp_path / "missing") == [[0], [1]]


def threads_cpus(pid: int) -> set[str]:
    """The Cpus_allowed_list of every thread of `pid`."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                lists.add(line.split(":", 1)[1].strip())
    return lists


def test_a_pinned_deployment_runs_every_thread_of_each_tier_on_its_cpus(plans):
    cpu = min(available_cpus())
    tiers = 3
    with LocalDeployment(plans["mlp"], port=0, threads=0, cpus=[frozenset({cpu})] * tiers
                         ) as deployment:
        for handle in deployment.tiers:
            assert threads_cpus(handle.process.pid) == {str(cpu)}
    with pytest.raises(WpkError, match="2 CPU sets for 3 tiers"):
        LocalDeployment(plans["mlp"], cpus=[frozenset({cpu})] * 2)


def test_cpus_this_process_may_not_use_are_one_line(plans):
    outside = max(available_cpus()) + 1
    result = subprocess.run([sys.executable, "-m", "wpk.runtime.server", str(plans["mlp"]),
                             "--tier", "cloud", "--cpus", str(outside)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"wpk: error: --cpus {outside}: CPU {outside} is not "
                                    f"available here")
    assert len(result.stderr.strip().splitlines()) == 1


def test_wpk_deploy_pin_cpus_splits_this_machine_or_says_it_cannot(plans):
    process = subprocess.Popen([sys.executable, "-m", "wpk.deploy.cli", str(plans["mlp"]),
                                "--local", "--port", "0", "--pin-cpus"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        if len(available_cpus()) < 3:
            assert process.wait(timeout=60) == 2
            assert "pinning 3 tiers needs 3 CPUs" in process.stderr.read()
            return
        lines = []
        for line in process.stdout:
            if line.startswith("entry:"):
                break
            lines.append(line)
        rows = [(int(cells[5]), parse_cpu_list(cells[6]))
                for cells in deploy_table(lines).values()]
        assert len(rows) == 3
        for pid, cpus in rows:
            assert threads_cpus(pid) == {format_cpu_list(cpus)}
        assert len(set().union(*(c for _, c in rows))) == sum(len(c) for _, c in rows)
    finally:
        process.terminate()
        process.wait(timeout=15)
