"""Start every tier of a plan on this machine, one `wpk-serve` process per tier.

Tiers start from the last to the first, so each knows the address of the next: the entry
tier listens on the given port, the others on free ports that each server reports on its
ready line. `stop()` sends SIGTERM to all, then SIGKILL to any still alive after a grace time.
"""
from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from wpk.errors import WpkError
from wpk.plan import load_plan
from wpk.runtime.cpus import format_cpu_list

READY_LINE = re.compile(r"ready on (?P<address>\S+) \(models: (?P<models>[^)]*)\)"
                        r"(?: metrics (?P<metrics>\S+))?(?: tensor-link (?P<link>\S+))?")


@dataclass
class TierProcess:
    tier: str
    process: subprocess.Popen
    address: str = ""
    models: tuple[str, ...] = ()
    metrics_url: str | None = None
    link_address: str | None = None   # its tensor link (None: it serves gRPC only)


class LocalDeployment:
    """Context manager: `with LocalDeployment(plan_dir, port=8001) as d: d.entry` -> address."""

    def __init__(self, plan_dir: str | Path, *, port: int = 8001, host: str = "127.0.0.1",
                 name: str | None = None, threads: int = 0, metrics: bool = True,
                 serve_args: list[str] | None = None, start_timeout: float = 60.0,
                 link: str = "tcp", cpus: Sequence[frozenset[int]] | None = None):
        """`link`: how the tiers pass tensors, `wpk-serve --link` (tcp or grpc); `cpus`: the
        CPUs each tier runs on, in plan order (`wpk-serve --cpus`; see runtime.cpus)."""
        self.plan_dir = Path(plan_dir)
        self.plan = load_plan(self.plan_dir)
        self.port, self.host, self.name = port, host, name
        self.threads, self.metrics, self.link = threads, metrics, link
        self.serve_args = list(serve_args or [])
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

    def command(self, tier: str, port: int, next_address: str | None) -> list[str]:
        cmd = [sys.executable, "-m", "wpk.runtime.server", str(self.plan_dir), "--tier", tier,
               "--port", str(port), "--host", self.host, "--threads", str(self.threads)]
        if self.link != "tcp":   # tcp is wpk-serve's own choice (gRPC where serve_args add TLS)
            cmd += ["--link", self.link]
        if next_address:
            cmd += ["--next", next_address]
        if self.name:
            cmd += ["--name", self.name]
        if self.metrics:
            cmd += ["--metrics-port", "0"]
        if self.cpus is not None:
            cmd += ["--cpus", format_cpu_list(self.cpus[self.plan.tier_index(tier)])]
        return cmd + self.serve_args

    def start(self) -> list[TierProcess]:
        started: list[TierProcess] = []
        next_address = None
        try:
            for index in reversed(range(len(self.plan.tiers))):
                tier = self.plan.tiers[index].name
                port = self.port if index == 0 else 0
                process = subprocess.Popen(
                    self.command(tier, port, next_address), stdout=subprocess.PIPE,
                    stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                handle = TierProcess(tier, process)
                started.insert(0, handle)
                self._wait_ready(handle)
                next_address = handle.address
        except BaseException:
            self.tiers = started
            self.stop()
            raise
        self.tiers = started
        return started

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
