"""What every deployment target shares: names, ports, and each tier's own view of a plan.

A tier ships only its own slice (the device need not hold the cloud's weights), so its copy of
`plan.json` keeps every tier's wiring but clears the `slice`/`optimized` fields of the others:
`wpk.plan.load_plan` checks that every slice a plan names exists.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from wpk.errors import WpkError
from wpk.plan import PLAN_FILE, Plan, TierPlan, load_plan

GRPC_PORT = 8001       # KServe v2 / Triton's gRPC port
# The tensor link (binary frames between tiers, wpk/runtime/tensor_link.py): fixed, so firewalls,
# images and Services can open it. The tier advertises the port it listens on and the previous
# tier dials it on the host it reaches the gRPC port by: wherever that host is a Service or a
# NAT, the port must be forwarded unchanged. gRPC + 1 (Triton's metrics port; ours is 9090).
LINK_PORT = 8002
METRICS_PORT = 9090
INSTALL_ROOT = "/opt/wpk"


def dns_label(*parts: str, limit: int = 63) -> str:
    """A DNS-1123 label (Kubernetes names, hostnames) from free text: 'ResNet_like' -> 'resnet-like'."""
    text = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)
    text = re.sub(r"-+", "-", text).strip("-")[:limit].rstrip("-")
    if not text:
        raise WpkError(f"cannot make a name from {parts!r}")
    return text if text[0].isalpha() else ("w" + text)[:limit]


def service_name(plan: Plan, tier: str) -> str:
    return dns_label("wpk", plan.name, tier)


def next_tier(plan: Plan, tier: str) -> TierPlan | None:
    i = plan.tier_index(tier)
    return plan.tiers[i + 1] if i + 1 < len(plan.tiers) else None


def next_address(plan: Plan, tier: str, default_host: str | None = None) -> str | None:
    """Where `tier` forwards to: the next tier's `address` from the tier spec, else
    `default_host` (or the next tier's name) on the standard port."""
    nxt = next_tier(plan, tier)
    if nxt is None:
        return None
    if nxt.address:
        return nxt.address if ":" in nxt.address else f"{nxt.address}:{GRPC_PORT}"
    return f"{default_host or dns_label(nxt.name)}:{GRPC_PORT}"


def link_port(plan: Plan, tier: str, use_tls: bool) -> int | None:
    """The fixed tensor-link port `tier` listens on (every tier: the previous tier's frames,
    or on the first tier clients' such as wpk-bridge --tensor-link), or None: TLS tiers pass
    tensors over their (encrypted) gRPC link instead."""
    plan.tier(tier)  # raises a clear error for an unknown tier
    return None if use_tls else LINK_PORT


def tier_plan_json(plan: Plan, tier: str) -> dict[str, Any]:
    """plan.json as `tier` ships it: other tiers' slices and optimized dirs cleared."""
    plan.tier(tier)  # raises a clear error for an unknown tier
    data = copy.deepcopy(plan.to_json())
    for entry in data["tiers"]:
        if entry["name"] != tier:
            entry["slice"] = None
            entry["optimized"] = None
    return data


def load(plan_dir: str | Path) -> tuple[Plan, Path]:
    """The plan and its directory (accepts the directory or its plan.json)."""
    plan_dir = Path(plan_dir)
    plan = load_plan(plan_dir)
    return plan, (plan_dir.parent if plan_dir.name == PLAN_FILE else plan_dir)


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"
