"""The tensor link's adapter over a `TierCore`: each request frame (see link_frames) runs in its
connection's thread (see link_server), from the previous tier or a client.

A tier's frame runs the pipeline from here; a client's ("k", see link_frames) is answered as
ModelInfer would answer it: a slice model with its slice's outputs, the pipeline model with
the model's outputs in their order. Every frame gets an answer: arrays, or the TierError's
code and message.
"""
from __future__ import annotations

import time

import grpc
import numpy as np

from wpk.runtime.link_frames import Frame
from wpk.runtime.link_server import Reply
from wpk.runtime.status import TierError, failure
from wpk.runtime.tier_core import TierCore


class LinkHandler:
    def __init__(self, core: TierCore):
        self.core = core

    def __call__(self, frame: Frame, reply: Reply) -> None:
        core = self.core
        started = time.perf_counter()
        model_name = str(frame.meta.get("m", ""))
        deadline = time.monotonic() + frame.timeout_ms / 1000.0 if frame.timeout_ms >= 0 \
            else None

        def finish(outcome: dict[str, np.ndarray] | TierError) -> None:
            if isinstance(outcome, TierError):
                code = outcome.code
                reply.fail(code, outcome.details)
            else:
                code = grpc.StatusCode.OK
                core.metrics.add_bytes("out", reply.ok(outcome))
            core.metrics.observe(model_name, code.name, time.perf_counter() - started)

        try:
            core.metrics.add_bytes("in", frame.nbytes)
            model = core.model(model_name)
            arrays = frame.arrays(model_name, model.inputs)
            pipeline = model.pipeline or not frame.meta.get("k")
            core.infer_here(model, arrays, deadline, pipeline, finish)
        except Exception as error:  # every request gets an answer, whatever went wrong
            finish(failure(error, core.where))
