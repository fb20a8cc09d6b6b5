"""Start every tier of a plan on this machine, one `wpk-serve` process per tier.

Tiers start from the last to the first, so each knows the address of the next: the entry
tier listens on the given port, the others on free ports that each server reports on its
ready line. `stop()` sends SIGTERM to all, then SIGKILL to any still alive after a grace time.

`revive()` is the supervisor's step, as the bundles' systemd units restart a tier: a tier that
exited is started again on the same ports (so the tier before it finds it where it was), after
a delay that grows while it keeps crashing; the other tiers keep serving meanwhile.
"""
from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from wpk.errors import WpkError
from wpk.launch import module_command
from wpk.plan import load_plan
from wpk.runtime.cpus import format_cpu_list

READY_LINE = re.compile(r"ready on (?P<address>\S+) \(models: (?P<models>[^)]*)\)"
                        r"(?: metrics (?P<metrics>\S+))?(?: tensor-link (?P<link>\S+))?")


# Seconds before restarting a tier that exited, by how many times in a row it crashed soon
# after starting (like systemd's RestartSec, growing).
RESTART_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
SOON_AFTER_START_S = 10.0


@dataclass
class TierProcess:
    tier: str
    process: subprocess.Popen
    address: str = ""
    models: tuple[str, ...] = ()
    metrics_url: str | None = None
    link_address: str | None = None   # its tensor link (None: it serves gRPC only)
    restarts: int = 0                 # how many times the supervisor started it again
    crashes_in_a_row: int = 0         # exits soon after starting, for the restart delay
    started_at: float = field(default_factory=time.monotonic)
    restart_due: float | None = None  # when an exited tier is started again


class LocalDeployment:
    """Context manager: `with LocalDeployment(plan_dir, port=8001) as d: d.entry` -> address."""

    def __init__(self, plan_dir: str | Path, *, port: int = 8001, host: str = "127.0.0.1",
                 name: str | None = None, threads: int = 0, metrics: bool = True,
                 serve_args: list[str] | None = None, start_timeout: float = 60.0,
                 link: str = "tcp", cpus: Sequence[frozenset[int]] | None = None,
                 tier_args: Mapping[str, Sequence[str]] | None = None):
        """`link`: how the tiers pass tensors, `wpk-serve --link` (tcp; "grpc", gRPC streams,
        was removed and means tcp, with one warning); `cpus`: the CPUs each tier runs on, in
        plan order (`wpk-serve --cpus`; see runtime.cpus); `serve_args` go to every tier's
        wpk-serve, `tier_args` to the named tier's only (the plan's batch per tier:
        wpk.deploy.cli.plan_batching_arguments)."""
        from wpk.runtime.next_tier import link_kind

        link_kind(link, tls=False)   # checks it, and warns once here rather than per tier
        self.plan_dir = Path(plan_dir)
        self.plan = load_plan(self.plan_dir)
        self.port, self.host, self.name = port, host, name
        self.threads, self.metrics = threads, metrics
        self.serve_args = list(serve_args or [])
        self.tier_args = {tier: list(extra) for tier, extra in (tier_args or {}).items()}
        if cpus is not None and len(cpus) != len(self.plan.tiers):
            raise WpkError(f"{len(cpus)} CPU sets for {len(self.plan.tiers)} tiers")
        self.cpus = list(cpus) if cpus is not None else None
        self.start_timeout = start_timeout
        self.tiers: list[TierProcess] = []

    @property
    def entry(self) -> str:
        """Address of the entry tier (serves the whole pipeline under the plan's name)."""
        return self.tiers[0].address

    def __enter__(self) -> "LocalDeployment":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self, tier: str, port: int, next_address: str | None, link_port: int = 0,
                restarts: int = 0, metrics_port: int = 0) -> list[str]:
        cmd = module_command("wpk.runtime.server", str(self.plan_dir), "--tier", tier,
                             "--port", str(port), "--host", self.host,
                             "--threads", str(self.threads))
        if link_port:
            cmd += ["--link-port", str(link_port)]
        if restarts:
            cmd += ["--restart-count", str(restarts)]
        if next_address:
            cmd += ["--next", next_address]
        if self.name:
            cmd += ["--name", self.name]
        if self.metrics:
            cmd += ["--metrics-port", str(metrics_port)]
        if self.cpus is not None:
            cmd += ["--cpus", format_cpu_list(self.cpus[self.plan.tier_index(tier)])]
        return cmd + self.serve_args + self.tier_args.get(tier, [])

    def start(self) -> list[TierProcess]:
        started: list[TierProcess] = []
        next_address = None
        try:
            for index in reversed(range(len(self.plan.tiers))):
                tier = self.plan.tiers[index].name
                handle = self._launch(tier, self.command(
                    tier, self.port if index == 0 else 0, next_address))
                started.insert(0, handle)
                self._wait_ready(handle)
                next_address = handle.address
        except BaseException:
            self.tiers = started
            self.stop()
            raise
        self.tiers = started
        return started

    @staticmethod
    def _launch(tier: str, command: list[str]) -> TierProcess:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return TierProcess(tier, process)

    def restart(self, index: int) -> TierProcess:
        """Start tier `index` again on the ports it had (gRPC, tensor link, metrics: the tier
        before it, and a Prometheus scraping it, find it where it was); its new handle."""
        old = self.tiers[index]
        if old.process.stdout is not None:
            old.process.stdout.close()
        port = int(old.address.rpartition(":")[2])
        link_port = int(old.link_address.rpartition(":")[2]) if old.link_address else 0
        metrics_port = int(re.search(r":(\d+)", old.metrics_url.rpartition("//")[2])[1]) \
            if old.metrics_url else 0
        following = self.tiers[index + 1].address if index + 1 < len(self.tiers) else None
        handle = self._launch(old.tier, self.command(old.tier, port, following, link_port,
                                                     old.restarts + 1, metrics_port))
        handle.restarts = old.restarts + 1
        handle.crashes_in_a_row = old.crashes_in_a_row
        handle.address, handle.link_address = old.address, old.link_address  # until ready
        handle.models, handle.metrics_url = old.models, old.metrics_url
        self.tiers[index] = handle
        self._wait_ready(handle)
        return handle

    def revive(self, report: Callable[[str], None]) -> None:
        """One supervisor step: schedule a restart for each tier that exited, and start those
        whose delay is over. `report` gets a line per event (the console, a log)."""
        now = time.monotonic()
        for index, handle in enumerate(self.tiers):
            code = handle.process.poll()
            if code is None:
                continue
            if handle.restart_due is None:
                # a restarted tier that dies again at once waits longer each time
                soon = handle.restarts > 0 and now - handle.started_at < SOON_AFTER_START_S
                handle.crashes_in_a_row = handle.crashes_in_a_row + 1 if soon else 0
                delay = RESTART_DELAYS_S[min(handle.crashes_in_a_row,
                                             len(RESTART_DELAYS_S) - 1)]
                handle.restart_due = now + delay
                report(f"tier {handle.tier} exited with code {code}; restarting it in "
                       f"{delay:g} s (the other tiers keep serving)")
                continue
            if now < handle.restart_due:
                continue
            try:
                new = self.restart(index)
            except WpkError as error:   # it died again while starting: try later, longer
                dead = self.tiers[index]
                dead.started_at, dead.restart_due = now, None
                report(f"tier {handle.tier}: restart failed: {error}")
                continue
            report(f"tier {new.tier} restarted (restart {new.restarts}, pid "
                   f"{new.process.pid}) on {new.address}")

    def _wait_ready(self, handle: TierProcess) -> None:
        deadline = time.monotonic() + self.start_timeout
        stream = handle.process.stdout
        assert stream is not None
        selector = selectors.DefaultSelector()
        selector.register(stream, selectors.EVENT_READ)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WpkError(f"tier {handle.tier!r} did not become ready within "
                                   f"{self.start_timeout:.0f} s")
                if not selector.select(timeout=min(left, 0.5)):
                    if handle.process.poll() is not None:
                        break
                    continue
                line = stream.readline().decode(errors="replace")
                if not line:
                    break
                match = READY_LINE.search(line)
                if match:
                    handle.address = match["address"]
                    handle.models = tuple(m.strip() for m in match["models"].split(","))
                    handle.metrics_url = match["metrics"]
                    handle.link_address = match["link"]
                    return
        finally:
            selector.close()
        code = handle.process.wait()
        raise WpkError(f"tier {handle.tier!r} exited with code {code} before becoming ready "
                       f"(its error is printed above)")

    def poll(self) -> TierProcess | None:
        """The first tier whose process has exited, if any."""
        for handle in self.tiers:
            if handle.process.poll() is not None:
                return handle
        return None

    def stop(self, grace: float = 5.0) -> None:
        for handle in self.tiers:
            if handle.process.poll() is None:
                handle.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for handle in self.tiers:
            try:
                handle.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                handle.process.kill()
                handle.process.wait()
            if handle.process.stdout is not None:
                handle.process.stdout.close()
