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

from wpk.errors import WpkError
from wpk.plan import load_plan

READY_LINE = re.compile(r"ready on (?P<address>\S+) \(models: (?P<models>[^)]*)\)"
                        r"(?: metrics (?P<metrics>\S+))?")


@dataclass
class TierProcess:
    tier: str
    process: subprocess.Popen
    address: str = ""
    models: tuple[str, ...] = ()
    metrics_url: str | None = None


class LocalDeployment:
    """Context manager: `with LocalDeployment(plan_dir, port=8001) as d: d.entry` -> address."""

    def __init__(self, plan_dir: str | Path, *, port: int = 8001, host: str = "127.0.0.1",
                 name: str | None = None, threads: int = 0, metrics: bool = True,
                 serve_args: list[str] | None = None, start_timeout: float = 60.0,
                 link: str = "tcp"):
        """`link`: how the tiers pass tensors, `wpk-serve --link` (tcp or grpc)."""
        self.plan_dir = Path(plan_dir)
        self.plan = load_plan(self.plan_dir)
        self.port, self.host, self.name = port, host, name
        self.threads, self.metrics, self.link = threads, metrics, link
        self.serve_args = list(serve_args or [])
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
