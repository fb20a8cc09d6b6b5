"""The profile file (version 1): per-node times of one model measured on one machine.

The format is documented in docs/profile-format.md and its JSON Schema ships in
wpk/schemas/profile.schema.json; every file read is validated against it.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from wpk.errors import WpkError
from wpk.files import read_json, write_json_rows
from wpk.json_schema import SCHEMA_DIR, check, load_schema

PROFILE_VERSION = 1
SCHEMA_PATH = SCHEMA_DIR / "profile.schema.json"


class ProfileMismatchWarning(UserWarning):
    """A profile's node names match the model but it was made from another file (sha256)."""


def profile_schema() -> dict[str, Any]:
    return load_schema("profile")


def validate_profile(document: Any, source: str) -> None:
    """Raise a one-line WpkError naming `source` and the first fault of `document`."""
    if isinstance(document, dict) and "version" in document \
            and document["version"] != PROFILE_VERSION:
        raise WpkError(f"{source}: unsupported profile version {document['version']!r} "
                       f"(this wpk reads version {PROFILE_VERSION})")
    if isinstance(document, dict) and document.get("kind") == "op-table":
        raise WpkError(f"{source}: a latency table, not a profile of one model (plan with "
                       f"--latency-table TIER=FILE)")
    check(document, "profile", source)
    seen: set[str] = set()
    for node in document["nodes"]:
        if node["name"] in seen:
            raise WpkError(f"{source}: node {node['name']!r} appears twice")
        seen.add(node["name"])


@dataclass(frozen=True)
class Profile:
    """A validated profile file, as the partitioner uses it."""

    path: Path | None
    device_name: str
    provider: str
    threads: int
    model_name: str
    sha256: str
    node_ms: dict[str, float]
    total_median_ms: float
    total_p90_ms: float | None
    runs: int
    op_types: dict[str, str] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    onnxruntime: str | None = None
    measured_at: str | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # as it ran

    def batch_for(self, graph) -> int | None:
        """How many requests each run of this profile held for `graph`: 1 when it ran at
        the graph's input shapes, N when at N times a batch-1 input along the first axis;
        None when the file does not say (no `input_shapes`) or the shapes are others."""
        batches = set()
        for name in graph.inputs:
            got, want = self.input_shapes.get(name), graph.tensors[name].shape
            if got is None or len(got) != len(want) or got[1:] != want[1:]:
                return None
            if got == want:
                batches.add(1)
            elif want[:1] == (1,):
                batches.add(got[0])
            else:
                return None
        return batches.pop() if len(batches) == 1 else None

    @property
    def label(self) -> str:
        """How messages name this profile: its file, else its device."""
        return str(self.path) if self.path is not None else f"profile of {self.device_name}"

    @classmethod
    def from_document(cls, document: Mapping[str, Any], path: Path | None = None) -> "Profile":
        validate_profile(document, str(path) if path else "profile")
        device, total = document["device"], document["total_ms"]
        return cls(
            path=path, device_name=device["name"], provider=device["provider"],
            threads=device["threads"], model_name=document["model"]["name"],
            sha256=document["model"]["sha256"],
            node_ms={n["name"]: float(n["ms"]) for n in document["nodes"]},
            total_median_ms=float(total["median"]),
            total_p90_ms=float(total["p90"]) if "p90" in total else None,
            runs=document["runs"],
            op_types={n["name"]: n["op_type"] for n in document["nodes"] if "op_type" in n},
            host=dict(device.get("host", {})), onnxruntime=device.get("onnxruntime"),
            measured_at=document.get("measured_at"),
            input_shapes={name: tuple(shape)
                          for name, shape in document.get("input_shapes", {}).items()})

    def mismatch(self, graph) -> str | None:
        """A warning text when this profile was made from another file than `graph`'s."""
        if graph.sha256 is not None and graph.sha256 != self.sha256:
            return (f"{self.label}: measured on another file than {graph.name} "
                    f"(sha256 {self.sha256[:12]}... vs {graph.sha256[:12]}...); "
                    "node names match, times may not")
        return None

    def node_times_for(self, graph) -> list[float]:
        """Times (ms) aligned with `graph.nodes`.

        Raises WpkError when the profile lacks any of the graph's nodes. When the file's
        sha256 differs from `graph.sha256`, issues a `ProfileMismatchWarning` through
        `warnings.warn` (the message is also returned by `mismatch(graph)`).
        """
        missing = [n.name for n in graph.nodes if n.name not in self.node_ms]
        if missing:
            raise WpkError(f"{self.label}: profile lacks {len(missing)} of the model's "
                           f"{len(graph.nodes)} nodes (first: {', '.join(missing[:3])})")
        message = self.mismatch(graph)
        if message:
            warnings.warn(message, ProfileMismatchWarning, stacklevel=2)
        return [self.node_ms[n.name] for n in graph.nodes]


def read_profile_document(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate a profile file; every fault is a one-line WpkError."""
    document = read_json(path, "profile")
    validate_profile(document, str(path))
    return document


def load_profile(path: str | os.PathLike) -> Profile:
    """Read, validate and wrap a profile file."""
    return Profile.from_document(read_profile_document(path), Path(path))


def save_profile(document: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Validate `document` and write it as indented JSON (one node per line)."""
    validate_profile(document, str(path))
    return write_json_rows(document, "nodes", path)
