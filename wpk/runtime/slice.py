"""Load a tier's executable slice: the optimizer's output when the plan names one, otherwise
the plain ONNX slice under ONNX Runtime."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from wpk.errors import WpkError, ort_error_line
from wpk.plan import TierPlan, slice_path


class Runner(Protocol):
    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]: ...


def load_runner(plan_dir: str | Path, tier: TierPlan, threads: int = 0,
                spin: bool = False) -> Runner:
    """ORT session for `tier` (or `wpk.optimizer.load(DIR)` when `tier.optimized` is set).

    `spin`: let ORT's intra-op threads spin-wait for work between runs (ORT's default). Off
    by default here: a spinning pool takes the cores the tier's event loop and gRPC threads
    (and, deployed locally, the other tiers) need; with ORT's default thread count on 2
    cores, spinning cost 40-45 % of pipelined throughput (mlp 300-330 vs 540 req/s)."""
    base = Path(plan_dir)
    base = base.parent if base.is_file() else base
    if tier.optimized:
        directory = base / tier.optimized
        if not directory.is_dir():
            raise WpkError(f"tier {tier.name!r}: optimized directory {directory} is missing")
        try:
            from wpk.optimizer import load  # lazily: the optimizer is optional here
        except ImportError as error:
            raise WpkError(f"tier {tier.name!r} is optimized but wpk.optimizer.load is "
                           f"unavailable ({error})") from None
        try:
            return load(directory)
        except WpkError as error:
            raise WpkError(f"tier {tier.name!r}: {error}") from None
        except Exception as error:  # whatever the optimized format raises
            raise WpkError(f"tier {tier.name!r}: cannot load optimized slice {directory}: "
                           f"{ort_error_line(error)}") from None
    import onnxruntime as ort

    path = slice_path(base, tier)
    try:
        return ort.InferenceSession(str(path), _options(threads, spin),
                                    providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types
        raise WpkError(f"tier {tier.name!r}: cannot load slice {path}: "
                       f"{ort_error_line(error)}") from None


def load_batched_runner(plan_dir: str | Path, tier: TierPlan, threads: int = 0,
                        spin: bool = False) -> Runner:
    """ORT session for `tier`'s plain slice with a symbolic batch dimension (see
    `batching.batchable`), for `wpk-serve --max-batch`. An optimized slice is refused: its
    kernels and layouts are tuned for the planned shapes."""
    import onnx
    import onnxruntime as ort

    from wpk.runtime.batching import batchable

    if tier.optimized:
        raise WpkError(f"tier {tier.name!r}: --max-batch needs the plain slice, and this tier "
                       f"serves an optimized one ({tier.optimized}, tuned for the planned "
                       f"batch): serve it without --max-batch, or re-plan without optimizing")
    base = Path(plan_dir)
    base = base.parent if base.is_file() else base
    path = slice_path(base, tier)
    try:
        model = batchable(onnx.load(str(path)))
        return ort.InferenceSession(model.SerializeToString(), _options(threads, spin),
                                    providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types
        raise WpkError(f"tier {tier.name!r}: cannot load slice {path} with a batch "
                       f"dimension: {ort_error_line(error)}") from None


def _options(threads: int, spin: bool):
    """ONNX Runtime's session options for a tier's slice (see load_runner's `spin`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
