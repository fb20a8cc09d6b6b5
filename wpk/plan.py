"""The plan format: what the partitioner decides and everything downstream consumes.

A plan directory holds `plan.json` and one ONNX slice per used tier. Tiers are listed in flow
order. A request enters the first tier with the model's inputs; each tier runs its slice on
`inputs`, sends `forward` to the next tier, and answers its caller with its own `results`
merged with whatever the next tier answered. Tensors that skip a tier are `passthrough`:
listed in that tier's inputs and outputs, handed on as they came. The slice's
ONNX inputs are `slice_inputs` (a subset of `inputs`) and its ONNX outputs `slice_outputs`.
See docs/plan-format.md for every field; wpk/schemas/plan.schema.json is checked on read.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from wpk.errors import WpkError
from wpk.files import read_text
from wpk.json_schema import check
from wpk.link_codecs import parse_codec
from wpk.tensor_spec import TensorSpec

# Version 2 adds dynamic batching (objective.max_batch, a tier's batch); a plan without it is
# written as version 1, which earlier wpk reads. This wpk reads both.
PLAN_VERSION = 2
PLAN_VERSIONS = (1, 2)
BATCHING_VERSION = 2
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class SourceModel:
    """A model's name and what it takes and gives: in a plan, the model the plan was cut from;
    in the bridge, a served model as its ModelMetadata describes it (no file, no hash)."""

    name: str
    file: str | None = None          # absolute path when partitioned, if known
    sha256: str | None = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "sha256": self.sha256,
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SourceModel":
        """Only `name` is required: hand-written plans may leave the rest out."""
        return cls(data["name"], data.get("file"), data.get("sha256"),
                   tuple(TensorSpec.from_json(t) for t in data.get("inputs", ())),
                   tuple(TensorSpec.from_json(t) for t in data.get("outputs", ())))


@dataclass(frozen=True)
class Objective:
    """What the cut was chosen for, under which constraints."""

    name: str = "latency"            # latency, throughput or bandwidth
    privacy: str = "raw-input-on-device"   # or none
    deliver_to: str | None = None    # tier that receives the model outputs (None: the first)
    max_latency_ms: float | None = None
    max_batch: int = 1               # throughput planned for batches of up to this many
    max_leakage: str | None = None   # bound on the tensors leaving the device: "dcor=0.3"
    leakage_data: str | None = None  # the calibration file leakage was measured on, or
    #                                  "synthetic"; None when not measured

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "privacy": self.privacy, "deliver_to": self.deliver_to,
                "max_latency_ms": self.max_latency_ms}
        if self.max_batch > 1:       # version 2 only
            data["max_batch"] = self.max_batch
        if self.max_leakage is not None:   # only when set: plans without them read as before
            data["max_leakage"] = self.max_leakage
        if self.leakage_data is not None:
            data["leakage_data"] = self.leakage_data
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Objective":
        """Every field has a default: hand-written plans may leave them out."""
        defaults = cls()
        return cls(data.get("name", defaults.name), data.get("privacy", defaults.privacy),
                   data.get("deliver_to"), data.get("max_latency_ms"),
                   max_batch=data.get("max_batch", defaults.max_batch),
                   max_leakage=data.get("max_leakage"),
                   leakage_data=data.get("leakage_data"))


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
    batch: int = 1                   # requests per slice run the plan assumes (version 2)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.batch == 1:          # as version 1 wrote it
            del data["batch"]
        return data


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
    # links from the device, when leakage was measured: per forward tensor, what it gives
    # away about the input (dcor, dcor_low, dcor_high, psnr_db, ssim)
    leakage: dict[str, dict[str, float]] | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"] = data.pop("src")
        data["to"] = data.pop("dst")
        if data["leakage"] is None:
            del data["leakage"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LinkPlan":
        fields = dict(data)
        fields["src"], fields["dst"] = fields.pop("from"), fields.pop("to")
        return cls(**fields)


@dataclass
class Plan:
    model: SourceModel
    objective: Objective
    tiers: list[TierPlan]
    links: list[LinkPlan]
    predicted: dict[str, Any]        # latency_ms, throughput_rps, ...: see docs/plan-format.md
    verification: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorSpec] = field(default_factory=dict)  # every crossing tensor
    version: int = 1                 # BATCHING_VERSION when the plan assumes batching

    def __post_init__(self) -> None:
        """Accept the JSON (dict) forms too, as callers wrote before the plan had types."""
        if isinstance(self.model, Mapping):
            self.model = SourceModel.from_json(self.model)
        if isinstance(self.objective, Mapping):
            self.objective = Objective.from_json(self.objective)
        self.tensors = {name: TensorSpec.from_json(spec) if isinstance(spec, Mapping) else spec
                        for name, spec in self.tensors.items()}

    # -- access -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.model.name

    def tier(self, name: str) -> TierPlan:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise WpkError(f"plan has no tier {name!r} (tiers: "
                       f"{', '.join(t.name for t in self.tiers)})")

    def tier_index(self, name: str) -> int:
        return self.tiers.index(self.tier(name))

    def tensor_spec(self, name: str) -> TensorSpec:
        return self.tensors[name]

    # -- JSON ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model": self.model.to_json(),
            "objective": self.objective.to_json(),
            "tiers": [t.to_json() for t in self.tiers],
            "links": [link.to_json() for link in self.links],
            "tensors": {name: spec.to_json() for name, spec in self.tensors.items()},
            "predicted": self.predicted,
            "verification": self.verification,
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PLAN_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, data: Any, where: str = PLAN_FILE) -> "Plan":
        """A plan from its JSON form; every fault is a one-line WpkError naming `where`."""
        validate_plan(data, where)
        try:
            return cls(model=SourceModel.from_json(data["model"]),
                       objective=Objective.from_json(data["objective"]),
                       tiers=[TierPlan(**t) for t in data["tiers"]],
                       links=[LinkPlan.from_json(link) for link in data["links"]],
                       predicted=data["predicted"], verification=data.get("verification", {}),
                       tensors={name: TensorSpec.from_json(spec)
                                for name, spec in data.get("tensors", {}).items()},
                       version=data["version"])
        except (KeyError, TypeError, ValueError) as error:  # past the schema: a bug, said so
            raise WpkError(f"{where}: malformed plan ({error})") from None


def validate_plan(data: Any, where: str) -> None:
    """The schema (wpk/schemas/plan.schema.json), then what it cannot say: dtypes, codecs."""
    if not isinstance(data, dict):
        raise WpkError(f"{where}: not a plan (expected a JSON object)")
    if data.get("version") not in PLAN_VERSIONS:
        raise WpkError(f"{where}: unsupported plan version {data.get('version')!r} "
                       f"(this wpk reads versions {', '.join(map(str, PLAN_VERSIONS))})")
    check(data, "plan", where)
    if data["version"] < BATCHING_VERSION:
        batched = ["objective.max_batch"] if "max_batch" in data["objective"] else []
        batched += [f"tiers[{i}].batch" for i, t in enumerate(data["tiers"]) if "batch" in t]
        if batched:
            raise WpkError(f"{where}: {batched[0]} needs plan version {BATCHING_VERSION} "
                           f"(the file says {data['version']})")
    specs = [(f"model.{side}[{i}]", spec) for side in ("inputs", "outputs")
             for i, spec in enumerate(data["model"].get(side, ()))]
    specs += [(f"tensors.{name}", spec) for name, spec in data.get("tensors", {}).items()]
    for field_name, spec in specs:
        try:
            np.dtype(spec["dtype"])
        except TypeError:
            raise WpkError(f"{where}: {field_name}.dtype: {spec['dtype']!r} is not a "
                           f"numpy dtype name") from None
    for i, link in enumerate(data["links"]):
        try:
            parse_codec(link.get("codec", "raw"))
        except WpkError as error:
            raise WpkError(f"{where}: links[{i}].codec: {error}") from None


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
