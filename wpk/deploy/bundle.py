"""`wpk-deploy PLAN_DIR --bundle OUT`: one self-contained directory per tier.

    OUT/<tier>/
      plan/plan.json, plan/<tier>.onnx   this tier's view of the plan and its slice only
      tier.env                           settings start.sh reads (ports, next tier, TLS,
                                         WPK_CPU_LATENCY_US: see wpk-serve --cpu-latency-us)
      start.sh                           runs wpk-serve for this tier
      wpk-<model>-<tier>.service         systemd unit (installed by install.sh)
      install.sh                         copies the bundle to /opt/wpk/<model>/<tier>, enables it
      Dockerfile                         an image of the same (used by the Kubernetes manifests)
      tls/ca.pem, tls/<tier>.pem/.key    with --tls: the CA and this tier's certificate
      manifest.json                      what is in here, with sha256 of every file

Copy a tier's directory to its machine and run `sudo ./install.sh` (or just `./start.sh`).
The next tier's address comes from the tier spec (`address:` in tiers.yaml); otherwise it is
the next tier's name on port 8001: edit `WPK_NEXT` in tier.env to point elsewhere. Every
tier also listens on the tensor-link port 8002 (`WPK_LINK_PORT`), which the previous tier
dials on the host of its `WPK_NEXT` (and, on the first tier, clients such as
wpk-bridge --tensor-link): open both ports between consecutive tiers. With --tls tensors
travel over the gRPC port only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from wpk.deploy import layout, tls
from wpk.errors import WpkError
from wpk.plan import Plan, slice_path

START_SH = """#!/bin/sh
# Start tier {tier} of {model}. Settings: tier.env next to this script.
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/tier.env"
set -- "$HERE/plan" --tier "$WPK_TIER" --host "$WPK_HOST" --port "$WPK_PORT" \\
    --metrics-port "$WPK_METRICS_PORT"
if [ -n "${{WPK_NEXT:-}}" ]; then set -- "$@" --next "$WPK_NEXT"; fi
if [ -n "${{WPK_LINK_PORT:-}}" ]; then set -- "$@" --link-port "$WPK_LINK_PORT"; fi
if [ -n "${{WPK_CPU_LATENCY_US:-}}" ]; then
    set -- "$@" --cpu-latency-us "$WPK_CPU_LATENCY_US"
fi
if [ -n "${{WPK_TLS_DIR:-}}" ]; then
    case "$WPK_TLS_DIR" in /*) ;; *) WPK_TLS_DIR="$HERE/$WPK_TLS_DIR" ;; esac
    set -- "$@" --tls-dir "$WPK_TLS_DIR"
fi
exec "${{WPK_SERVE:-wpk-serve}}" "$@"
"""

UNIT = """[Unit]
Description=wpk tier {tier} of {model} (Open Inference Protocol gRPC, port {port}{link_text})
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
WorkingDirectory={root}
ExecStart={root}/start.sh
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=2
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""

INSTALL_SH = """#!/bin/sh
# Install this tier under {root} and start it with systemd.
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "{root}"
cp -R "$HERE/." "{root}/"
install -m 0644 "$HERE/{unit}" /etc/systemd/system/{unit}
systemctl daemon-reload
systemctl enable --now {unit}
echo "installed {unit}: systemctl status {unit}"
"""

DOCKERFILE = """# Image of tier {tier} of {model}: docker build -t {image} .
FROM python:3.11-slim
ARG WPK_PIP_SPEC="wpk[serve]"
RUN pip install --no-cache-dir "$WPK_PIP_SPEC"
COPY . {root}
EXPOSE {ports}
ENTRYPOINT ["{root}/start.sh"]
"""


def _env_file(values: dict[str, Any]) -> str:
    """Shell assignments that keep a value already in the environment (so
    `WPK_PORT=9000 ./start.sh` works) and otherwise set the bundled default."""
    lines = ["# Settings of this tier; start.sh reads them (shell syntax). A variable already",
             "# set in the environment wins, e.g. WPK_PORT=9000 ./start.sh"]
    for key, value in values.items():
        lines.append(f'{key}="${{{key}-{"" if value is None else value}}}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, executable: bool = False) -> None:
    path.write_text(text)
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_name(plan: Plan, tier: str, registry: str | None = None, tag: str = "latest") -> str:
    name = layout.service_name(plan, tier)
    return f"{registry.rstrip('/')}/{name}:{tag}" if registry else f"{name}:{tag}"


def tls_hosts(plan: Plan) -> dict[str, list[str]]:
    """Names each tier's certificate must carry: its Kubernetes service, its spec address."""
    hosts: dict[str, list[str]] = {}
    for tier in plan.tiers:
        names = [layout.service_name(plan, tier.name), layout.dns_label(tier.name)]
        if tier.address:
            names.append(tier.address.rsplit(":", 1)[0])
        hosts[tier.name] = names
    return hosts


def prepare_tls(plan: Plan, tls_dir: str | Path) -> Path:
    """Use certificates already in `tls_dir`, or generate them there."""
    tls_dir = Path(tls_dir)
    names = [t.name for t in plan.tiers]
    if not tls.has_credentials(tls_dir, names):
        tls.generate(tls_dir, [n for n in names
                               if not (tls_dir / f"{n}.pem").exists()], tls_hosts(plan))
    for name in names:
        tls.load(tls_dir, name)  # every file present and PEM
    return tls_dir


def write_bundle(plan_dir: str | Path, out: str | Path, *, tls_dir: str | Path | None = None,
                 registry: str | None = None, install_root: str = layout.INSTALL_ROOT
                 ) -> list[Path]:
    """Write one directory per tier under `out`; returns them in flow order."""
    plan, plan_dir = layout.load(plan_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        existing = {t.name for t in plan.tiers} & {p.name for p in out.iterdir()}
        if existing:
            raise WpkError(f"{out}: already holds a bundle for tier(s) "
                           f"{', '.join(sorted(existing))}; choose an empty directory")
    from wpk.optimizer.executor import check_directory

    for tier in plan.tiers:   # a bundle is copied to another machine: complete or nothing
        if tier.optimized:
            check_directory(plan_dir / tier.optimized)
    if tls_dir is not None:
        tls_dir = prepare_tls(plan, tls_dir)
    model = layout.dns_label(plan.name)
    written = []
    for tier in plan.tiers:
        root = f"{install_root}/{model}/{layout.dns_label(tier.name)}"
        unit = f"{layout.service_name(plan, tier.name)}.service"
        directory = out / tier.name
        (directory / "plan").mkdir(parents=True)
        (directory / "plan" / "plan.json").write_text(
            layout.dumps(layout.tier_plan_json(plan, tier.name)))
        if tier.slice:
            shutil.copy2(slice_path(plan_dir, tier), directory / "plan" / tier.slice)
        if tier.optimized:
            shutil.copytree(plan_dir / tier.optimized, directory / "plan" / tier.optimized)
        link_port = layout.link_port(plan, tier.name, tls_dir is not None)
        env = {"WPK_TIER": tier.name, "WPK_HOST": "0.0.0.0", "WPK_PORT": layout.GRPC_PORT,
               "WPK_LINK_PORT": link_port or "", "WPK_METRICS_PORT": layout.METRICS_PORT,
               "WPK_NEXT": layout.next_address(plan, tier.name) or "",
               "WPK_TLS_DIR": "tls" if tls_dir is not None else "",
               "WPK_CPU_LATENCY_US": ""}   # e.g. 0: see wpk-serve --cpu-latency-us
        if tls_dir is not None:
            (directory / "tls").mkdir()
            for name in (tls.CA_CERT, f"{tier.name}.pem", f"{tier.name}.key"):
                shutil.copy2(Path(tls_dir) / name, directory / "tls" / name)
            os.chmod(directory / "tls" / f"{tier.name}.key", 0o600)
        fmt = dict(tier=tier.name, model=plan.name, root=root, unit=unit,
                   port=layout.GRPC_PORT, metrics_port=layout.METRICS_PORT,
                   ports=" ".join(str(p) for p in (layout.GRPC_PORT, link_port,
                                                    layout.METRICS_PORT) if p),
                   link_text=f", tensor link {link_port}" if link_port else "",
                   image=image_name(plan, tier.name, registry))
        _write(directory / "tier.env", _env_file(env))
        _write(directory / "start.sh", START_SH.format(**fmt), executable=True)
        _write(directory / unit, UNIT.format(**fmt))
        _write(directory / "install.sh", INSTALL_SH.format(**fmt), executable=True)
        _write(directory / "Dockerfile", DOCKERFILE.format(**fmt))
        files = sorted(p for p in directory.rglob("*") if p.is_file())
        manifest = {"model": plan.name, "tier": tier.name, "install_root": root,
                    "unit": unit, "image": fmt["image"], "port": layout.GRPC_PORT,
                    "link_port": link_port, "metrics_port": layout.METRICS_PORT,
                    "next": env["WPK_NEXT"] or None,
                    "tls": tls_dir is not None,
                    "files": {str(p.relative_to(directory)): _sha256(p) for p in files}}
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        written.append(directory)
    return written
