"""Run `wpk-bridge` next to a local deployment: `wpk-deploy PLAN --local --mqtt HOST:PORT`.

The deploy CLI calls `start_bridge` once the tiers are up and treats the returned process like
a tier (polled, stopped with SIGTERM). Without `--bridge-config` one JSON route is set up:
    wpk/<model>/<source>/input  ->  wpk/<model>/<source>/result   (errors: wpk/<model>/errors)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from wpk.errors import WpkError

from .config import parse_address


def bridge_command(mqtt: str, entry: str, model: str, config: str | Path | None = None,
                   client_id: str | None = None) -> list[str]:
    parse_address(mqtt, "--mqtt", 1883)
    command = [sys.executable, "-m", "wpk.runtime.bridge.cli", "--broker", mqtt,
               "--pipeline", entry, "--model", model,
               "--client-id", client_id or f"wpk-bridge-{model}"]
    if config is not None:
        if not Path(config).is_file():
            raise WpkError(f"--bridge-config {config}: no such file")
        return command + ["--config", str(config)]
    return command + ["--error-topic", f"wpk/{model}/errors",
                      "--subscribe", f"wpk/{model}/+/input", "--format", "json",
                      "--publish", f"wpk/{model}/{{2}}/result"]


def start_bridge(mqtt: str, entry: str, model: str,
                 config: str | Path | None = None) -> subprocess.Popen:
    """Start the bridge process (its log goes to this process's stderr)."""
    return subprocess.Popen(bridge_command(mqtt, entry, model, config),
                            stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
