"""A quiet CPU ONNX Runtime session on an in-memory model, for checks that run a model on the
side (slice verification, leakage measurement): ORT's own failure becomes one WpkError line."""
from __future__ import annotations

from typing import Any, Callable

import onnx

from wpk.errors import WpkError, ort_error_line


def cpu_session(model: onnx.ModelProto, refusal: Callable[[str], str]) -> Any:
    """The session, or WpkError(refusal(first line of ORT's error))."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT's own exception types
        raise WpkError(refusal(ort_error_line(error))) from None
