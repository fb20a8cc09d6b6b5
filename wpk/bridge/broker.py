"""A Mosquitto broker configured the way the bridge needs it, for tests, benchmarks and demos.

The settings that matter for "nothing lost" (see docs/mqtt.md):
- `max_queued_messages 0`: Mosquitto's default (1000) silently drops QoS 1 messages queued
  for a slow or absent subscriber, such as a bridge waiting for its pipeline.
- `persistence true`: sessions and their queued QoS 1 messages survive a broker restart.
- `set_tcp_nodelay true`: small messages go out at once (Nagle's algorithm against delayed
  ACKs otherwise costs tens of milliseconds per message).
"""
from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def broker_config(port: int, data_dir: Path, host: str = "127.0.0.1") -> str:
    return "\n".join([
        f"listener {port} {host}",
        "allow_anonymous true",
        "max_queued_messages 0",
        "persistence true",
        f"persistence_location {data_dir}/",
        "autosave_interval 1",
        "set_tcp_nodelay true",           # else Nagle + delayed ACKs add ~40 ms per hop
        # As root, Mosquitto would switch to user `mosquitto`, which may not write data_dir.
        f"user {getpass.getuser()}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        ""])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port}")


class Mosquitto:
    """Mosquitto on a free 127.0.0.1 port, restartable with its persisted state."""

    def __init__(self, workdir: Path, port: int | None = None, extra: str = ""):
        """`extra`: more mosquitto.conf lines (e.g. a TLS listener), appended."""
        self.port = port or free_port()
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(broker_config(self.port, self.dir.resolve()) + extra)
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        with open(self.dir / "mosquitto.log", "ab") as log:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                            stdout=subprocess.DEVNULL, stderr=log)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        """SIGTERM: Mosquitto writes its persistence file (sessions, queued QoS 1), exits."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
