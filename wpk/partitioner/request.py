"""`PartitionRequest`: everything one partitioning needs, built once (by `wpk-partition` or a
caller of `partition(...)`) and passed down whole instead of as a chain of arguments."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from wpk.errors import ParameterError, refuse_unknown_choice
from wpk.graph import Graph
from wpk.tiers import Tiers
from wpk.partitioner.costs import Efficiency, TierCosts
from wpk.partitioner.leakage import LeakageReport, parse_bound

OBJECTIVES = ("latency", "throughput", "bandwidth")
MAX_BATCH = 4096      # as wpk-serve --max-batch takes
PRIVACY_MODES = ("raw-input-on-device", "none")


@dataclass(frozen=True)
class PartitionRequest:
    """What to cut, across which tiers, for what, priced how, and what to write."""

    # what to cut
    model: str | Path | Graph
    input_shapes: Mapping[str, Sequence[int]] | None = None   # fixes dynamic inputs
    # across which tiers: names or a Tiers, else the tiers file's; then link/codec overrides
    tiers: Sequence[str] | Tiers | None = None
    tiers_file: str | Path | None = None
    links: Sequence[str] = ()            # "SRC-DST=BW,RTT"
    codecs: Sequence[str] = ()           # "SRC-DST=CODEC"
    # for what
    objective: str = "latency"
    max_latency_ms: float | None = None
    privacy: str = "raw-input-on-device"
    deliver_to: str | None = None        # tier that needs the results (default: the first)
    pins: Mapping[str, str] = field(default_factory=dict)    # node -> tier
    max_batch: int = 1                   # throughput: tiers run batches of up to this many
    # how much of the input may leave the device: "dcor=0.3", "psnr=18" or "ssim=0.5" bounds
    # every tensor crossing the device's link; figures measured on calibration_data (an .npz,
    # one array per input, samples first; None: random inputs, labelled synthetic) or given
    max_leakage: str | None = None
    calibration_data: str | Path | None = None
    leakage_samples: int | None = None   # the first N samples
    leakage: LeakageReport | None = None
    # priced how: measured cost columns per tier (several = candidate machines), else roofline
    measured: Mapping[str, Sequence[TierCosts]] | None = None
    efficiency: Efficiency | None = None  # roofline efficiencies; None: calibrate or defaults
    use_calibration: bool = True
    # what to write and show
    out_dir: str | Path | None = None    # None: decide only, write nothing
    verify: bool = True                  # check the chained slices against the whole model
    force: bool = False                  # replace an earlier plan at out_dir
    other_inputs: Sequence[str | Path] = ()   # files never to overwrite (profiles)
    top: int = 0                         # also rank up to this many configurations
    with_front: bool = False             # also compute the latency / bytes Pareto front

    def check(self) -> None:
        """The goal's own consistency, before any file is read."""
        refuse_unknown_choice(self.objective, OBJECTIVES, "objective")
        refuse_unknown_choice(self.privacy, PRIVACY_MODES, "privacy mode")
        bound = self.max_latency_ms
        if bound is not None and not 0 < bound < math.inf:
            raise ParameterError(f"{{max_latency_ms}} must be a positive number, not {bound:g}",
                                 "max_latency_ms")
        if self.max_leakage is not None:
            parse_bound(self.max_leakage)
        if self.objective == "bandwidth" and bound is None:
            raise ParameterError("the bandwidth objective needs a latency bound: "
                                 "{max_latency_ms}", "max_latency_ms")
        self._check_batch()

    def _check_batch(self) -> None:
        batch = self.max_batch
        if isinstance(batch, bool) or not isinstance(batch, int) or \
                not 1 <= batch <= MAX_BATCH:
            raise ParameterError(f"{{max_batch}} must be an integer from 1 to {MAX_BATCH}, "
                                 f"not {batch!r}", "max_batch")
        if batch > 1 and self.objective != "throughput":
            raise ParameterError(f"{{max_batch}} {batch} plans for throughput under dynamic "
                                 f"batching: it needs {{objective}} throughput, not "
                                 f"{self.objective}", "max_batch", "objective")
        if batch > 1 and self.max_latency_ms is not None:
            raise ParameterError("{max_latency_ms} bounds a lone request's latency, which a "
                                 "request waiting for and running in a batch does not keep: "
                                 "give {max_latency_ms} or {max_batch}, not both",
                                 "max_latency_ms", "max_batch")

    @property
    def keeps_raw_input_on_device(self) -> bool:
        return self.privacy != "none"

    @property
    def ranks_alternatives(self) -> bool:
        return self.top > 1 or self.with_front
