"""Tier and link specs: the hardware of each tier and the links between consecutive tiers.

Tiers are ordered in the direction data flows (device first). `--tiers device,edge,cloud`
uses built-in presets; a tiers file (YAML) sets or overrides any of it:

```yaml
tiers:
  - name: device
    preset: rpi4              # optional: start from a hardware preset
    peak_gflops: 12           # any field overrides the preset
  - {name: edge, preset: edge-cpu}
  - {name: cloud, preset: cloud-gpu, address: 10.0.0.7:8001}
links:
  - {from: device, to: edge, bandwidth: 20mbit, rtt: 5ms}
  - {from: edge, to: cloud, bandwidth_mbps: 100, rtt_ms: 40}
```
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from wpk.errors import WpkError, refuse_unknown_keys
from wpk.files import read_yaml
from wpk.link_codecs import CODEC_BYTE_FACTOR, parse_codec


@dataclass(frozen=True)
class TierSpec:
    """One tier's hardware, as the roofline cost model sees it."""

    name: str
    hardware: str = "custom"
    role: str = "edge"               # device | edge | cloud: where "beyond the edge" starts
    peak_gflops: float = 100.0       # sustained fp32 GFLOP/s of the tier's compute
    mem_bandwidth_gbps: float = 20.0  # GB/s
    op_overhead_us: float = 5.0      # fixed cost per operator launch
    cores: int = 4
    memory_mb: int = 4096
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    gpus: int = 0
    address: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["providers"] = list(self.providers)
        return data


@dataclass(frozen=True)
class LinkSpec:
    """The network between two consecutive tiers."""

    src: str
    dst: str
    bandwidth_mbps: float  # megabits per second
    rtt_ms: float
    codec: str = "raw"     # wire encoding of the tensors crossing it (see wpk.link_codecs)

    @property
    def name(self) -> str:
        return f"{self.src}-{self.dst}"

    @property
    def byte_factor(self) -> float:
        """Wire bytes per tensor byte under this link's codec (zstd's data-dependent gain
        is not counted)."""
        return CODEC_BYTE_FACTOR[parse_codec(self.codec)[0]]

    def transfer_ms(self, nbytes: float) -> float:
        """Serialization time of `nbytes` on this link, without the RTT."""
        return nbytes * 8 / (self.bandwidth_mbps * 1e6) * 1e3

    def to_json(self) -> dict[str, Any]:
        return {"from": self.src, "to": self.dst, "bandwidth_mbps": self.bandwidth_mbps,
                "rtt_ms": self.rtt_ms, "codec": self.codec}


# Sustained numbers for ONNX Runtime-class inference, not datasheet peaks.
HARDWARE_PRESETS: dict[str, dict[str, Any]] = {
    "mcu": dict(peak_gflops=0.5, mem_bandwidth_gbps=0.5, op_overhead_us=50, cores=1,
                memory_mb=64),
    "rpi4": dict(peak_gflops=8, mem_bandwidth_gbps=4, op_overhead_us=20, cores=4,
                 memory_mb=4096),
    "rpi5": dict(peak_gflops=30, mem_bandwidth_gbps=8, op_overhead_us=12, cores=4,
                 memory_mb=8192),
    "jetson-nano": dict(peak_gflops=150, mem_bandwidth_gbps=20, op_overhead_us=40, cores=4,
                        memory_mb=4096, gpus=1,
                        providers=("CUDAExecutionProvider", "CPUExecutionProvider")),
    "jetson-orin": dict(peak_gflops=1500, mem_bandwidth_gbps=100, op_overhead_us=25, cores=8,
                        memory_mb=16384, gpus=1,
                        providers=("CUDAExecutionProvider", "CPUExecutionProvider")),
    "edge-cpu": dict(peak_gflops=250, mem_bandwidth_gbps=40, op_overhead_us=6, cores=16,
                     memory_mb=65536),
    "cloud-cpu": dict(peak_gflops=800, mem_bandwidth_gbps=100, op_overhead_us=5, cores=64,
                      memory_mb=262144),
    "cloud-gpu": dict(peak_gflops=8000, mem_bandwidth_gbps=300, op_overhead_us=15, cores=16,
                      memory_mb=131072, gpus=1,
                      providers=("CUDAExecutionProvider", "CPUExecutionProvider")),
}

# What a bare tier name means.
TIER_PRESETS: dict[str, tuple[str, str]] = {  # name -> (hardware preset, role)
    "device": ("rpi4", "device"),
    "edge": ("edge-cpu", "edge"),
    "cloud": ("cloud-gpu", "cloud"),
}

# Default links by the roles they join: (bandwidth Mbit/s, RTT ms).
DEFAULT_LINKS: dict[tuple[str, str], tuple[float, float]] = {
    ("device", "edge"): (100.0, 2.0),     # plant Ethernet to a nearby server
    ("edge", "cloud"): (100.0, 40.0),     # WAN uplink
    ("device", "cloud"): (20.0, 60.0),    # cellular straight to the cloud
}

_TIER_FIELDS = {f for f in TierSpec.__dataclass_fields__}


def make_tier(name: str, preset: str | None = None, role: str | None = None,
              **overrides: Any) -> TierSpec:
    """A tier from an optional hardware preset plus overrides."""
    base_preset, base_role = TIER_PRESETS.get(name, (None, None))
    preset = preset or base_preset
    values: dict[str, Any] = {}
    if preset is not None:
        if not isinstance(preset, str) or preset not in HARDWARE_PRESETS:
            raise WpkError(f"tier {name!r}: unknown hardware preset {preset!r} "
                           f"(known: {', '.join(sorted(HARDWARE_PRESETS))})")
        values.update(HARDWARE_PRESETS[preset])
        values["hardware"] = preset
    refuse_unknown_keys(overrides, _TIER_FIELDS, f"tier {name!r}", "field")
    values.update(overrides)
    values["role"] = role or base_role or values.get("role", "edge")
    _check_tier_fields(name, values)
    values["providers"] = tuple(values.get("providers", TierSpec.providers))
    return TierSpec(name=name, **values)


_LINK_KEYS = ("from", "to", "bandwidth", "bandwidth_mbps", "rtt", "rtt_ms", "codec")
_NUMBER_FIELDS = ("peak_gflops", "mem_bandwidth_gbps", "op_overhead_us", "cores", "memory_mb",
                  "gpus")
ROLES = ("device", "edge", "cloud")


def _check_tier_fields(name: str, values: dict[str, Any]) -> None:
    """One-line errors for fields of the wrong type or range (tiers files are hand-written)."""
    for key in _NUMBER_FIELDS:
        value = values.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WpkError(f"tier {name!r}: {key} must be a number, not {value!r}")
        if value < 0:
            raise WpkError(f"tier {name!r}: {key} must not be negative")
    for key in ("peak_gflops", "mem_bandwidth_gbps"):
        if key in values and values[key] <= 0:
            raise WpkError(f"tier {name!r}: {key} must be positive")
    if values["role"] not in ROLES:
        raise WpkError(f"tier {name!r}: role must be one of {', '.join(ROLES)}, "
                       f"not {values['role']!r}")
    providers = values.get("providers", ())
    if not isinstance(providers, (list, tuple)) or \
            not all(isinstance(p, str) for p in providers):
        raise WpkError(f"tier {name!r}: providers must be a list of ONNX Runtime provider names")
    if not isinstance(values.get("address") or "", str):
        raise WpkError(f"tier {name!r}: address must be HOST:PORT text")
    if not isinstance(values.get("node_selector", {}), dict):
        raise WpkError(f"tier {name!r}: node_selector must be a mapping")


@dataclass(frozen=True)
class Tiers:
    """Tiers in flow order and the link between each consecutive pair."""

    tiers: tuple[TierSpec, ...]
    links: tuple[LinkSpec, ...]

    def __post_init__(self) -> None:
        if not self.tiers:
            raise WpkError("no tiers given")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise WpkError(f"tier names repeat: {','.join(names)}")
        if len(self.links) != len(self.tiers) - 1:
            raise WpkError("need exactly one link between each pair of consecutive tiers")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise WpkError(f"unknown tier {name!r} (tiers: {', '.join(self.names)})") from None

    def __len__(self) -> int:
        return len(self.tiers)

    def __getitem__(self, i: int) -> TierSpec:
        return self.tiers[i]

    def with_tier(self, i: int, tier: TierSpec) -> "Tiers":
        return replace(self, tiers=self.tiers[:i] + (tier,) + self.tiers[i + 1:])


def _default_roles(names: Sequence[str]) -> list[str]:
    roles = []
    for i, name in enumerate(names):
        if name in TIER_PRESETS:
            roles.append(TIER_PRESETS[name][1])
        elif i == 0:
            roles.append("device")
        elif i == len(names) - 1 and len(names) > 2:
            roles.append("cloud")
        else:
            roles.append("edge")
    return roles


def _default_link(src: TierSpec, dst: TierSpec) -> LinkSpec:
    bandwidth, rtt = DEFAULT_LINKS.get((src.role, dst.role), (100.0, 10.0))
    return LinkSpec(src.name, dst.name, bandwidth, rtt)


_BANDWIDTH_UNITS = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3,
                    "kbps": 1e-3, "mbps": 1.0, "gbps": 1e3}
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"


def parse_bandwidth_mbps(value: Any, where: str) -> float:
    """20, '20mbit', '1gbit', '500kbit' -> Mbit/s."""
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    match = re.fullmatch(rf"\s*({_NUMBER})\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _BANDWIDTH_UNITS or float(match.group(1)) <= 0:
        raise WpkError(f"{where}: bad bandwidth {value!r} (e.g. 20mbit, 1gbit, 500kbit)")
    return float(match.group(1)) * _BANDWIDTH_UNITS[unit]


def parse_time_ms(value: Any, where: str) -> float:
    """5, '5ms', '0.2s' -> milliseconds."""
    if isinstance(value, (int, float)) and value >= 0:
        return float(value)
    match = re.fullmatch(rf"\s*({_NUMBER})\s*([a-z]*)\s*", str(value).lower())
    unit = (match.group(2) or "ms") if match else ""
    if not match or unit not in _TIME_UNITS:
        raise WpkError(f"{where}: bad time {value!r} (e.g. 5ms, 0.2s)")
    return float(match.group(1)) * _TIME_UNITS[unit]


def parse_link_spec(text: str) -> tuple[str, str, float, float]:
    """'device-edge=10mbit,5ms' -> ('device', 'edge', 10.0, 5.0)."""
    pair, sep, values = text.partition("=")
    src, dash, dst = pair.partition("-")
    parts = values.split(",")
    if not sep or not dash or len(parts) != 2:
        raise WpkError(f"bad link {text!r}: expected SRC-DST=BANDWIDTH,RTT like "
                       "device-edge=10mbit,5ms")
    return (src, dst, parse_bandwidth_mbps(parts[0], f"link {pair}"),
            parse_time_ms(parts[1], f"link {pair}"))


def load_tiers(names: Sequence[str] | None = None, tiers_file: str | Path | None = None,
               link_overrides: Sequence[str] = (), codec_overrides: Sequence[str] = ()
               ) -> Tiers:
    """Tiers from `--tiers a,b,c` names and/or a tiers file, then `--link` and `--codec`
    (SRC-DST=CODEC) overrides."""
    file_tiers: dict[str, dict[str, Any]] = {}
    file_order: list[str] = []
    file_links: dict[tuple[str, str], tuple[float, float, str]] = {}
    if tiers_file is not None:
        file_order, file_tiers, file_links = _read_tiers_file(Path(tiers_file))
    order = list(names) if names else file_order
    if not order:
        raise WpkError("no tiers: pass --tiers device,edge,cloud or a tiers file")
    roles = _default_roles(order)
    specs = []
    for name, role in zip(order, roles):
        if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            raise WpkError(f"bad tier name {name!r}: use letters, digits, '_' and '.'")
        fields = dict(file_tiers.get(name, {}))
        if name not in TIER_PRESETS and "preset" not in fields and name not in file_tiers:
            raise WpkError(f"unknown tier {name!r}: built-in tiers are "
                           f"{', '.join(TIER_PRESETS)}; define others in a tiers file")
        fields.setdefault("role", role)
        try:
            specs.append(make_tier(name, **fields))
        except WpkError as error:
            if name in file_tiers:   # the fault is in the file: say which
                raise WpkError(f"{tiers_file}: {error}") from None
            raise
    links = []
    for src, dst in zip(specs, specs[1:]):
        if (src.name, dst.name) in file_links:
            links.append(LinkSpec(src.name, dst.name, *file_links[(src.name, dst.name)]))
        else:
            links.append(_default_link(src, dst))

    def link_index(src: str, dst: str) -> int:
        for i, link in enumerate(links):
            if (link.src, link.dst) == (src, dst):
                return i
        raise WpkError(f"link {src}-{dst} joins no two consecutive tiers "
                       f"({', '.join(l.name for l in links) or 'no links'})")

    for text in link_overrides:
        src, dst, bandwidth, rtt = parse_link_spec(text)
        i = link_index(src, dst)
        links[i] = replace(links[i], bandwidth_mbps=bandwidth, rtt_ms=rtt)
    for text in codec_overrides:
        pair, sep, codec = text.partition("=")
        src, dash, dst = pair.partition("-")
        if not sep or not dash or not codec.strip():
            raise WpkError(f"bad codec {text!r}: expected SRC-DST=CODEC like "
                           "edge-cloud=fp16+zstd")
        parse_codec(codec)
        i = link_index(src, dst)
        links[i] = replace(links[i], codec=codec.lower())
    return Tiers(tuple(specs), tuple(links))


def _read_tiers_file(path: Path):
    data = read_yaml(path, "tiers")
    if not isinstance(data, dict) or not isinstance(data.get("tiers"), list):
        raise WpkError(f"{path}: expected a mapping with a 'tiers' list")
    refuse_unknown_keys(data, ("tiers", "links"), str(path))
    order, tiers = [], {}
    for i, entry in enumerate(data["tiers"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise WpkError(f"{path}: tiers[{i}] needs a 'name'")
        fields = {k: v for k, v in entry.items() if k != "name"}
        order.append(entry["name"])
        tiers[entry["name"]] = fields
    links = {}
    for i, entry in enumerate(data.get("links") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("from"), str) \
                or not isinstance(entry.get("to"), str):
            raise WpkError(f"{path}: links[{i}] needs 'from' and 'to' (tier names)")
        where = f"{path}: link {entry['from']}-{entry['to']}"
        refuse_unknown_keys(entry, _LINK_KEYS, where)
        if entry["from"] == entry["to"]:
            raise WpkError(f"{where}: joins a tier to itself (a link joins two tiers)")
        if (entry["from"], entry["to"]) in links:
            raise WpkError(f"{where}: given twice (links[{i}] repeats an earlier link); "
                           "keep one")
        bandwidth = entry.get("bandwidth", entry.get("bandwidth_mbps"))
        rtt = entry.get("rtt", entry.get("rtt_ms"))
        if bandwidth is None or rtt is None:
            raise WpkError(f"{where}: needs a bandwidth and an rtt")
        codec = str(entry.get("codec", "raw"))
        try:
            parse_codec(codec)
        except WpkError as error:
            raise WpkError(f"{where}: {error}") from None
        links[(entry["from"], entry["to"])] = (parse_bandwidth_mbps(bandwidth, where),
                                               parse_time_ms(rtt, where), codec.lower())
    for ends in links:
        for end, name in zip(("from", "to"), ends):
            if name not in tiers and name not in TIER_PRESETS:
                raise WpkError(f"{path}: link {end} unknown tier {name!r}")
        if all(end in order for end in ends) and order.index(ends[0]) > order.index(ends[1]):
            raise WpkError(f"{path}: link {ends[0]}-{ends[1]} goes backwards: data flows in "
                           f"the order of the tiers ({' -> '.join(order)}), so a link goes "
                           f"from {ends[1]} to {ends[0]}")
    return order, tiers, links
