"""The plan format: what the partitioner decides and everything downstream consumes.

A plan directory holds `plan.json` and one ONNX slice per used tier. Tiers are listed in flow
order. A request enters the first tier with the model's inputs; each tier runs its slice on
`inputs`, sends `forward` to the next tier, and answers its caller with its own `results`
merged with whatever the next tier answered. Tensors that skip a tier are `passthrough`:
listed in that tier's inputs and outputs, handed on as they came. The slice's
ONNX inputs are `slice_inputs` (a subset of `inputs`) and its ONNX outputs `slice_outputs`.
See docs/plan-format.md for every field.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wpk.errors import WpkError
from wpk.files import read_text

PLAN_VERSION = 1
PLAN_FILE = "plan.json"

# Wire codecs a link may declare: a base encoding, optionally followed by "+zstd".
CODEC_BASES = ("raw", "fp16", "int8")
# Bytes on the wire per byte of a float32 tensor, before zstd (whose gain depends on data).
CODEC_BYTE_FACTOR = {"raw": 1.0, "fp16": 0.5, "int8": 0.25}


def parse_codec(spec: str | None) -> tuple[str, bool]:
    """"fp16+zstd" -> ("fp16", True); "zstd" -> ("raw", True); WpkError on anything else."""
    parts = [p.strip() for p in (spec or "raw").lower().split("+") if p.strip()]
    bases = [p for p in parts if p != "zstd"]
    if len(bases) > 1 or any(b not in CODEC_BASES for b in bases) or parts.count("zstd") > 1:
        raise WpkError(f"unknown codec {spec!r} (use raw, fp16 or int8, optionally "
                       "followed by +zstd)")
    return (bases[0] if bases else "raw"), "zstd" in parts


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str  # numpy dtype name, e.g. "float32"

    @property
    def nbytes(self) -> int:
        import numpy as np

        count = 1
        for d in self.shape:
            count *= d
        return count * np.dtype(self.dtype).itemsize


@dataclass
class TierPlan:
    name: str
    slice: str | None                # ONNX file, relative to the plan directory
    nodes: list[str]                 # model node names this tier runs
    inputs: list[str]                # what arrives (from the client or the previous tier)
    outputs: list[str]               # forward + results
    slice_inputs: list[str]          # the slice's own ONNX inputs
    slice_outputs: list[str]         # the slice's own ONNX outputs
    forward: list[str]               # sent to the next tier
    results: list[str]               # model outputs this tier answers with
    passthrough: list[str]           # in inputs and in outputs: handed on as it came
    predicted_compute_ms: float
    hardware: dict[str, Any] = field(default_factory=dict)
    cost_source: str = "estimated"
    machine: str | None = None       # chosen machine when a tier had candidates
    profile: dict[str, Any] | None = None  # {"name", "sha256"} of the profile planned from
    address: str | None = None
    optimized: str | None = None     # directory (relative) written by wpk-optimize, if any


@dataclass
class LinkPlan:
    src: str
    dst: str
    bandwidth_mbps: float
    rtt_ms: float
    tensors: list[str]               # forward over this link
    bytes: int
    return_tensors: list[str]        # results travelling back over this link
    return_bytes: int
    predicted_transfer_ms: float     # forward + return serialization + RTT share
    via: list[str] = field(default_factory=list)  # unused tiers the link passes through
    codec: str = "raw"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"] = data.pop("src")
        data["to"] = data.pop("dst")
        return data


@dataclass
class Plan:
    model: dict[str, Any]            # name, file, sha256, inputs, outputs (TensorSpec dicts)
    objective: dict[str, Any]        # name, privacy, deliver_to, max_latency_ms
    tiers: list[TierPlan]
    links: list[LinkPlan]
    predicted: dict[str, Any]
    verification: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # every crossing tensor
    version: int = PLAN_VERSION

    # -- access -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.model["name"]

    def tier(self, name: str) -> TierPlan:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise WpkError(f"plan has no tier {name!r} (tiers: "
                       f"{', '.join(t.name for t in self.tiers)})")

    def tier_index(self, name: str) -> int:
        return self.tiers.index(self.tier(name))

    def tensor_spec(self, name: str) -> TensorSpec:
        return TensorSpec(**self.tensors[name])

    # -- JSON ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model": self.model,
            "objective": self.objective,
            "tiers": [asdict(t) for t in self.tiers],
            "links": [link.to_json() for link in self.links],
            "tensors": self.tensors,
            "predicted": self.predicted,
            "verification": self.verification,
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PLAN_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = PLAN_FILE) -> "Plan":
        if not isinstance(data, dict):
            raise WpkError(f"{where}: not a plan (expected a JSON object)")
        if data.get("version") != PLAN_VERSION:
            raise WpkError(f"{where}: unsupported plan version {data.get('version')!r} "
                           f"(this wpk reads version {PLAN_VERSION})")
        try:
            tiers = [TierPlan(**t) for t in data["tiers"]]
            links = []
            for link in data["links"]:
                link = dict(link)
                link["src"], link["dst"] = link.pop("from"), link.pop("to")
                links.append(LinkPlan(**link))
            return cls(model=data["model"], objective=data["objective"], tiers=tiers,
                       links=links, predicted=data["predicted"],
                       verification=data.get("verification", {}),
                       tensors=data.get("tensors", {}), version=data["version"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise WpkError(f"{where}: malformed plan ({error})") from None


def load_plan(directory: str | Path) -> Plan:
    """Read `DIR/plan.json` and check that every slice it names exists."""
    directory = Path(directory)
    path = directory / PLAN_FILE if directory.is_dir() else directory
    if not path.exists():
        raise WpkError(f"{path}: no plan here (expected a directory written by wpk-partition)")
    try:
        data = json.loads(read_text(path, "plan"))
    except json.JSONDecodeError as error:
        raise WpkError(f"{path}: not valid JSON (line {error.lineno})") from None
    plan = Plan.from_json(data, str(path))
    for tier in plan.tiers:
        if tier.slice and not (path.parent / tier.slice).exists():
            raise WpkError(f"{path}: slice {tier.slice} of tier {tier.name!r} is missing")
    return plan


def slice_path(directory: str | Path, tier: TierPlan) -> Path:
    """Absolute path of a tier's slice inside a plan directory."""
    if tier.slice is None:
        raise WpkError(f"tier {tier.name!r} has no slice")
    directory = Path(directory)
    base = directory.parent if directory.name == PLAN_FILE else directory
    return base / tier.slice
