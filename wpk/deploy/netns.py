"""Linux network namespaces joined by shaped veth pairs: one namespace per tier, in a chain.

`Topology(["device", "edge", "cloud"], [10.0, 100.0])` builds

    [ns device] veth --10 Mbit/s-- veth [ns edge] veth --100 Mbit/s-- veth [ns cloud]

Link k joins tier k (address 10.77.k.1) and tier k+1 (10.77.k.2). Bandwidth is shaped in both
directions with a `tbf` qdisc on each end (this kernel has no `netem`: round-trip time is added
in user space by `wpk.deploy.delay_relay`). Processes started through `Topology.popen` run inside
a tier's namespace and die with their parent. `close()` (also on exceptions, via `with`) kills
those processes and deletes the namespaces, which removes their veths with them.

Every name carries the creating process id (`wpk<pid>.<tier>`), so `remove_stale()` can delete
what a killed run left behind without touching a running one.
"""
from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Sequence

from wpk.errors import WpkError

NS_PREFIX = "wpk"
_serial = itertools.count()  # veth names must be unique while several topologies exist
_MIN_BURST_BYTES = 1600  # > one 1514-byte frame; tbf splits GSO super-packets


def is_root() -> bool:
    return os.geteuid() == 0


def require_root(tool: str = "wpk-emulate") -> None:
    """Fail with one clear line when we cannot create namespaces."""
    if not is_root():
        raise WpkError(f"{tool} needs root (it creates network namespaces, veth pairs and tc "
                       f"qdiscs): run it with sudo")
    for binary in ("ip", "tc"):
        if subprocess.run(["which", binary], capture_output=True).returncode != 0:
            raise WpkError(f"{tool} needs the '{binary}' command (Debian: apt-get install "
                           "iproute2)")


def run(*argv: str) -> str:
    """Run one `ip`/`tc` command; a failure becomes a WpkError naming the command."""
    result = subprocess.run(list(argv), capture_output=True, text=True)
    if result.returncode != 0:
        raise WpkError(f"`{' '.join(argv)}` failed: {result.stderr.strip() or result.returncode}")
    return result.stdout


def list_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces left by wpk runs whose process is gone; returns their names."""
    removed = []
    for name in list_namespaces():
        match = re.fullmatch(rf"{NS_PREFIX}(\d+)\..+", name)
        if match and not _pid_alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


def tbf_args(bandwidth_mbps: float) -> list[str]:
    """tbf parameters for a rate: a burst of ~1 ms (so short transfers are not sent faster
    than the rate) but at least one GSO segment's worth, and a queue deep enough that local
    TCP senders (held back by TCP small queues) never see drops."""
    rate_bytes = bandwidth_mbps * 1e6 / 8
    burst = max(_MIN_BURST_BYTES, int(rate_bytes * 0.001))
    limit = max(4 * burst, int(rate_bytes * 0.5), 1 << 20)
    return ["rate", f"{bandwidth_mbps * 1000:.0f}kbit", "burst", str(burst), "limit", str(limit)]


def _dying_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped so that it gets SIGTERM when the process that started it dies.

    setpriv sets the parent-death signal before it execs, so no Python code runs between
    fork and exec: a preexec_fn would, and in a process that has loaded gRPC (tests, the
    emulation's own client) gRPC's fork handlers then sometimes abort the child."""
    return ["setpriv", "--pdeathsig", "TERM", *argv]


@dataclass(frozen=True)
class VethLink:
    """Link k: tier k's end (`src_*`) and tier k+1's end (`dst_*`)."""

    index: int
    src_tier: str
    dst_tier: str
    src_dev: str
    dst_dev: str
    src_addr: str
    dst_addr: str
    bandwidth_mbps: float


class Topology:
    """Tiers in a chain of namespaces; use as a context manager (or call close())."""

    def __init__(self, tiers: Sequence[str], bandwidths_mbps: Sequence[float],
                 tag: str | None = None):
        if len(bandwidths_mbps) != len(tiers) - 1:
            raise WpkError("need one bandwidth per pair of consecutive tiers")
        for name in tiers:
            if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
                raise WpkError(f"bad tier name {name!r} for a namespace")
        self.tag = tag or f"{NS_PREFIX}{os.getpid()}"
        self.tiers = list(tiers)
        self.namespaces = {t: f"{self.tag}.{t}" for t in tiers}
        self.links: list[VethLink] = []
        serial = next(_serial) % 1000
        for k, bandwidth in enumerate(bandwidths_mbps):
            if bandwidth <= 0:
                raise WpkError(f"link {tiers[k]}-{tiers[k + 1]}: bandwidth must be positive")
            # interface names are at most 15 characters, and live in the root namespace
            # for a moment before they move: keep them unique per run.
            short = f"w{os.getpid() % 100000}n{serial}l{k}"
            self.links.append(VethLink(k, tiers[k], tiers[k + 1], short + "a", short + "b",
                                       f"10.77.{k}.1", f"10.77.{k}.2", float(bandwidth)))
        self._created: list[str] = []
        self._processes: list[subprocess.Popen] = []
        self._closed = False

    # -- life cycle ---------------------------------------------------------------------
    def create(self) -> "Topology":
        require_root()
        try:
            for tier in self.tiers:
                ns = self.namespaces[tier]
                run("ip", "netns", "add", ns)
                self._created.append(ns)
                run("ip", "-n", ns, "link", "set", "lo", "up")
            for link in self.links:
                src_ns, dst_ns = self.namespaces[link.src_tier], self.namespaces[link.dst_tier]
                run("ip", "link", "add", link.src_dev, "type", "veth", "peer", "name",
                    link.dst_dev)
                run("ip", "link", "set", link.src_dev, "netns", src_ns)
                run("ip", "link", "set", link.dst_dev, "netns", dst_ns)
                for ns, dev, addr in ((src_ns, link.src_dev, link.src_addr),
                                      (dst_ns, link.dst_dev, link.dst_addr)):
                    run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                    run("ip", "-n", ns, "link", "set", dev, "up")
                    run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                        *tbf_args(link.bandwidth_mbps))
        except BaseException:
            self.close()
            raise
        return self

    def set_bandwidth(self, link_index: int, bandwidth_mbps: float) -> None:
        """Reshape one link in place (both directions)."""
        link = self.links[link_index]
        for tier, dev in ((link.src_tier, link.src_dev), (link.dst_tier, link.dst_dev)):
            run("tc", "-n", self.namespaces[tier], "qdisc", "replace", "dev", dev, "root",
                "tbf", *tbf_args(bandwidth_mbps))
        self.links[link_index] = VethLink(**{**link.__dict__, "bandwidth_mbps": bandwidth_mbps})

    def close(self) -> None:
        """Kill our processes, delete our namespaces (and with them the veths). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for process in self._processes:
            _stop(process)
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in self.links:  # a veth still in the root namespace if create() failed early
            subprocess.run(["ip", "link", "del", link.src_dev], capture_output=True)

    def __enter__(self) -> "Topology":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- processes ----------------------------------------------------------------------
    def exec_argv(self, tier: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[tier], *argv]

    def popen(self, tier: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start `argv` inside `tier`'s namespace; it is stopped by close()."""
        if self._closed:
            raise WpkError("topology is closed")
        process = subprocess.Popen(_dying_with_parent(self.exec_argv(tier, argv)),
                                   start_new_session=True, **kwargs)
        self._processes.append(process)
        return process

    def run_in(self, tier: str, argv: Sequence[str], timeout: float | None = None,
               **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` to completion inside `tier`'s namespace."""
        return subprocess.run(_dying_with_parent(self.exec_argv(tier, argv)), timeout=timeout,
                              start_new_session=True, **kwargs)

    def established(self, tier: str, address: str, port: int) -> int:
        """How many TCP connections from `tier`'s namespace to `address`:`port` are open."""
        out = run(*self.exec_argv(tier, ["ss", "-Htn", "state", "established", "dst",
                                         f"{address}:{port}"]))
        return len([line for line in out.splitlines() if line.strip()])

    def address_of(self, tier: str, facing: str) -> str:
        """The address of `tier` on its link to the neighbouring tier `facing`."""
        for link in self.links:
            if (link.src_tier, link.dst_tier) == (tier, facing):
                return link.src_addr
            if (link.dst_tier, link.src_tier) == (tier, facing):
                return link.dst_addr
        raise WpkError(f"tiers {tier!r} and {facing!r} are not neighbours")


def _stop(process: subprocess.Popen, grace_s: float = 3.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        process.terminate()
    deadline = time.monotonic() + grace_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            process.kill()
        process.wait()
