"""A profile of an optimized slice (`wpk-optimize --profile FILE`): the per-node times of the
model as its chosen candidate runs it, for `wpk-partition --profile TIER=FILE`.

Why: a plan priced from plain ONNX Runtime times misses what the optimizer did. A pruned
convolution that the sparse kernels run 2-4x faster looks as slow as a dense one, so the cut
does not move when it should. Here the chosen graph (ONNX Runtime's saved graph with wpk's
custom operators, or the tuned model) runs under ONNX Runtime's profiler, and every kernel's
time lands on the model's own nodes (`wpk.attribution`: a custom operator names the nodes it
replaces).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from wpk.errors import WpkError
from wpk.optimizer.executor import OrtSegment, load
from wpk.profiling import profile_model


def profile_optimized(model_path: str | Path, directory: str | Path,
                      **profile_options: Any) -> dict[str, Any]:
    """The profile document of `model_path` as `directory` (wpk-optimize's output for it)
    runs it; `profile_options` as for `wpk.profiling.profile_model`."""
    directory = Path(directory)
    session = load(directory)
    segments = session.segments
    if len(segments) != 1 or not isinstance(segments[0], OrtSegment):
        kinds = ", ".join(sorted({type(s).__name__ for s in segments}))
        raise WpkError(f"{directory}: its slice runs as {len(segments)} segment(s) ({kinds}); "
                       f"a per-node profile needs one ONNX Runtime session (profile the model "
                       f"itself with wpk-profile instead)")
    segment = segments[0]
    entry = session.manifest["segments"][0]
    offline = segment.model_file == entry.get("offline_model")
    library = directory / entry["custom_ops"] if offline and entry.get("custom_ops") else None
    threads = int(session.manifest["session"].get("threads", 0)) or None
    return profile_model(model_path, run_model=directory / segment.model_file,
                         custom_ops=library, optimization="disable" if offline else "all",
                         threads=profile_options.pop("threads", None) or threads,
                         **profile_options)
