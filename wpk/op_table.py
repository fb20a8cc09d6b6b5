"""The latency table file (version 1): single operators timed on one machine.

`wpk-profile --ops` writes it (`wpk.op_bench`); `wpk-partition --latency-table TIER=FILE`
reads it through the predictor (`wpk.op_predict`). The format is documented in
docs/op-tables.md and its JSON Schema ships in wpk/schemas/op-table.schema.json; every file
read is validated against it, so a table written by another tool is held to the same rules.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from wpk.errors import WpkError
from wpk.files import read_json, write_json_rows
from wpk.json_schema import check

TABLE_VERSION = 1


@dataclass(frozen=True)
class TableEntry:
    """One timed operator: its family, FLOPs, bytes touched and kernel time (ms)."""

    family: str
    flops: float
    bytes: float
    ms: float
    case: str = ""
    op_type: str = ""


@dataclass(frozen=True)
class OpTable:
    """A validated latency table, as the predictor uses it."""

    path: Path | None
    device_name: str
    provider: str
    threads: int
    entries: tuple[TableEntry, ...]
    run_overhead_ms: float
    node_overhead_ms: float
    nchwc_block: int = 0             # ORT's channel block on that machine (0: no NCHWc)
    scale: float = 1.0               # kernel time in a network / alone (calibration.scale)
    footprint: dict[str, float] | None = None   # the scale against bytes touched per run
    grid: str | None = None
    host: dict[str, Any] = field(default_factory=dict)
    onnxruntime: str | None = None

    @property
    def label(self) -> str:
        """How messages name this table: its file, else its device."""
        return str(self.path) if self.path is not None else f"table of {self.device_name}"

    def families(self) -> dict[str, list[TableEntry]]:
        grouped: dict[str, list[TableEntry]] = {}
        for entry in self.entries:
            grouped.setdefault(entry.family, []).append(entry)
        return grouped

    @classmethod
    def from_document(cls, document: Mapping[str, Any], path: Path | None = None) -> "OpTable":
        validate_table(document, str(path) if path else "latency table")
        device, overhead = document["device"], document["overhead_ms"]
        entries = tuple(TableEntry(e["family"], float(e["flops"]), float(e["bytes"]),
                                   float(e["ms"]), e.get("case", ""), e.get("op_type", ""))
                        for e in document["entries"])
        calibration = document.get("calibration", {})
        return cls(path, device["name"], device["provider"], device["threads"], entries,
                   float(overhead["run"]), float(overhead["node"]),
                   int(document.get("layout", {}).get("nchwc_block", 0)),
                   float(calibration.get("scale", 1.0)), calibration.get("footprint"),
                   document.get("grid"), dict(device.get("host", {})),
                   device.get("onnxruntime"))


def validate_table(document: Any, source: str) -> None:
    """Raise a one-line WpkError naming `source` and the first fault of `document`."""
    if isinstance(document, dict) and "version" in document \
            and document["version"] != TABLE_VERSION:
        raise WpkError(f"{source}: unsupported latency table version {document['version']!r} "
                       f"(this wpk reads version {TABLE_VERSION})")
    if isinstance(document, dict) and document.get("kind") != "op-table" \
            and "nodes" in document:
        raise WpkError(f"{source}: a profile of one model, not a latency table (plan with "
                       f"--profile TIER=FILE; wpk-profile --ops writes tables)")
    check(document, "op-table", source)


def read_table_document(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate a table file; every fault is a one-line WpkError."""
    document = read_json(path, "latency table")
    validate_table(document, str(path))
    return document


def load_table(path: str | os.PathLike) -> OpTable:
    """Read, validate and wrap a latency table file."""
    return OpTable.from_document(read_table_document(path), Path(path))


def save_table(document: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Validate `document` and write it as JSON, one entry per line."""
    validate_table(document, str(path))
    return write_json_rows(document, "entries", path)
