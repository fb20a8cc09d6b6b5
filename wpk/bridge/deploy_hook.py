"""Run `wpk-bridge` next to a local deployment: `wpk-deploy PLAN --local --mqtt HOST:PORT`.

The deploy CLI calls `start_bridge` once the tiers are up and treats the returned process like
a tier (polled, stopped with SIGTERM). Without `--bridge-config` one JSON route is set up,
and requests enter over the entry tier's tensor link (`--tensor-link`):
    wpk/<model>/<source>/input  ->  wpk/<model>/<source>/result   (errors: wpk/<model>/errors)
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from wpk.errors import WpkError
from wpk.launch import module_command

from .config import parse_address


def bridge_arguments(mqtt: str, entry: str, model: str, config: str | Path | None = None,
                     client_id: str | None = None) -> list[str]:
    """wpk-bridge's command line for a deployment's entry tier."""
    parse_address(mqtt, "--mqtt", 1883)
    arguments = ["--broker", mqtt, "--pipeline", entry, "--model", model,
                 "--client-id", client_id or f"wpk-bridge-{model}"]
    if config is not None:
        if not Path(config).is_file():
            raise WpkError(f"--bridge-config {config}: no such file")
        return arguments + ["--config", str(config)]
    # the entry tier runs on this host: its tensor link is the cheapest way in
    return arguments + ["--tensor-link", "--error-topic", f"wpk/{model}/errors",
                        "--subscribe", f"wpk/{model}/+/input", "--format", "json",
                        "--publish", f"wpk/{model}/{{2}}/result"]


def check_bridge(mqtt: str, model: str, config: str | Path | None = None) -> None:
    """Everything the bridge would refuse at its start, checked before the tiers start (its
    pipeline address is not known yet: a stand-in takes its place)."""
    from .cli import build_parser, config_from_args

    argv = bridge_arguments(mqtt, "127.0.0.1:8001", model, config)
    config_from_args(build_parser().parse_args(argv))


def start_bridge(mqtt: str, entry: str, model: str,
                 config: str | Path | None = None) -> subprocess.Popen:
    """Start the bridge process (its log goes to this process's stderr)."""
    return subprocess.Popen(module_command("wpk.bridge.cli",
                                           *bridge_arguments(mqtt, entry, model, config)),
                            stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
