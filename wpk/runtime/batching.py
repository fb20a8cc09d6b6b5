"""Dynamic batching at a tier: requests that arrive close together run as one batch.

Many devices feeding one edge tier each send a batch of one. Run one by one, the slice pays
its fixed costs (operator dispatch, thread hand-offs, small matrix products that leave cores
idle) once per request. The batcher holds the oldest waiting request up to
`max_queue_delay_s` for others, concatenates their inputs along the batch axis (axis 0), runs
the slice once, and splits every output back by request. Triton's dynamic batcher is the
model (a maximum batch, a maximum queue delay counted from the oldest request's arrival).

Per request: its own results, in its own shapes; a request whose deadline passes while it
waits leaves the queue with the error `expired()` gives, and the others are not held back
for it; a failed batch fails each of its requests with the same error. Requests whose
inputs differ in any dimension but the first wait for a batch of their own shape.

The slice must compute each row of the batch independently of the others: `batchable`
makes a slice's batch dimension symbolic, and `check_batched` proves on random rows that a
batch of two gives what two single runs give, before a tier accepts `--max-batch`.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np
import onnx

from wpk import cli_args
from wpk.errors import WpkError

# the command-line checks of --max-batch and --max-queue-delay-us (wpk-serve, wpk-deploy)
MAX_BATCH = cli_args.int_between(1, 4096, "batches beyond 4096 rows only add queueing")
QUEUE_DELAY_US = cli_args.int_between(0, 10_000_000, "at most 10 s")
DEFAULT_QUEUE_DELAY_US = 1000

BATCH_DIM = "wpk_batch"


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int                 # rows per slice run (the sum of the requests' first dims)
    max_queue_delay_s: float       # how long the oldest request may wait for others


SERVE_MAX_BATCH_HELP = ("run up to N requests that arrive together as one batch of the slice "
                        "(many devices feeding one tier; the slice must take a batch "
                        "dimension, which the tier proves on start). Default 1: no batching")


def add_batching_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                           max_batch_help: str = SERVE_MAX_BATCH_HELP) -> None:
    """--max-batch and --max-queue-delay-us, defined once for every command that takes
    them (wpk-serve; wpk-deploy, which hands them on to each tier's wpk-serve)."""
    parser.add_argument("--max-batch", type=MAX_BATCH, default=1, metavar="N",
                        help=max_batch_help)
    parser.add_argument("--max-queue-delay-us", type=QUEUE_DELAY_US,
                        default=DEFAULT_QUEUE_DELAY_US, metavar="US",
                        help="with --max-batch: how long the oldest request may wait for "
                        f"others to join its batch (default {DEFAULT_QUEUE_DELAY_US})")


def batch_policy_from_args(args: argparse.Namespace) -> BatchPolicy:
    """The policy the two flags of `add_batching_arguments` describe."""
    return BatchPolicy(args.max_batch, args.max_queue_delay_us / 1e6)


@dataclass
class _Waiting:
    feeds: dict[str, np.ndarray]
    rows: int
    shape_key: tuple
    deadline: float | None         # time.monotonic(); None: none
    arrived: float
    result: asyncio.Future


def _rows(feeds: dict[str, np.ndarray]) -> int:
    sizes = {a.shape[0] if a.ndim else 0 for a in feeds.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise WpkError("batching: every input needs the same first (batch) dimension, got "
                       + ", ".join(f"{n} {list(a.shape)}" for n, a in feeds.items()))
    return sizes.pop()


class Batcher:
    """Collects requests and runs them through `run_batch` (an awaitable slice run on the
    concatenated inputs) in batches of at most `policy.max_batch` rows."""

    def __init__(self, run_batch: Callable[[dict[str, np.ndarray]],
                                           Awaitable[dict[str, np.ndarray]]],
                 policy: BatchPolicy, expired: Callable[[], Exception]) -> None:
        self.run_batch = run_batch
        self.policy = policy
        self.expired = expired
        self.waiting: deque[_Waiting] = deque()
        self.arrival = asyncio.Event()
        self.collector: asyncio.Task | None = None
        self.batches = 0            # slice runs
        self.rows = 0               # rows they ran

    async def run(self, feeds: dict[str, np.ndarray],
                  deadline: float | None = None) -> dict[str, np.ndarray]:
        """The slice's outputs for this request's `feeds`, computed in a batch."""
        rows = _rows(feeds)
        key = tuple((name, feeds[name].shape[1:], feeds[name].dtype.str)
                    for name in sorted(feeds))
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(feeds, rows, key, deadline, time.monotonic(), future))
        self.arrival.set()
        if self.collector is None or self.collector.done():
            self.collector = asyncio.create_task(self._collect())
        return await future

    async def stop(self) -> None:
        if self.collector is not None:
            self.collector.cancel()
            try:
                await self.collector
            except asyncio.CancelledError:
                pass
        for item in self.waiting:
            if not item.result.done():
                item.result.set_exception(WpkError("the tier is stopping"))
        self.waiting.clear()

    def _queued_rows(self, key: tuple) -> int:
        return sum(item.rows for item in self.waiting if item.shape_key == key)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for item in list(self.waiting):
            if item.result.done():                     # the caller gave up
                self.waiting.remove(item)
            elif item.deadline is not None and now >= item.deadline:
                self.waiting.remove(item)
                item.result.set_exception(self.expired())

    async def _collect(self) -> None:
        while self.waiting:
            self._drop_expired()
            if not self.waiting:
                break
            oldest = self.waiting[0]
            # hold the batch open for more requests of the oldest one's shape
            while self._queued_rows(oldest.shape_key) < self.policy.max_batch:
                left = oldest.arrived + self.policy.max_queue_delay_s - time.monotonic()
                if oldest.deadline is not None:
                    left = min(left, oldest.deadline - time.monotonic())
                if left <= 0:
                    break
                self.arrival.clear()
                try:
                    await asyncio.wait_for(self.arrival.wait(), left)
                except asyncio.TimeoutError:
                    break
            self._drop_expired()
            batch, rows = [], 0
            for item in list(self.waiting):
                if item.shape_key != oldest.shape_key or \
                        (batch and rows + item.rows > self.policy.max_batch):
                    continue       # the oldest always goes, even alone beyond max_batch
                batch.append(item)
                rows += item.rows
                self.waiting.remove(item)
            if batch:
                await self._run(batch, rows)

    async def _run(self, batch: list[_Waiting], rows: int) -> None:
        names = list(batch[0].feeds)
        feeds = {name: batch[0].feeds[name] if len(batch) == 1 else
                 np.concatenate([item.feeds[name] for item in batch]) for name in names}
        try:
            outputs = await self.run_batch(feeds)
        except Exception as error:     # the slice failed: every request in it hears why
            for item in batch:
                if not item.result.done():
                    item.result.set_exception(error)
            return
        self.batches += 1
        self.rows += rows
        start = 0
        for item in batch:
            part = {name: value[start:start + item.rows] for name, value in outputs.items()}
            start += item.rows
            if not item.result.done():
                item.result.set_result(part)


def batchable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose inputs' and outputs' first dimension is symbolic (and without
    the inferred shapes that pinned it): what a batched run loads. Whether it really
    computes rows independently is for `check_batched` to show."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    initializers = {i.name for i in out.graph.initializer}
    for value in list(out.graph.input) + list(out.graph.output):
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM
    del out.graph.value_info[:]
    return out


def check_batched(run_batched: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
                  run_single: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
                  rows: list[dict[str, np.ndarray]], label: str) -> None:
    """Raise WpkError unless running `rows` (single-row feeds) as one batch gives what
    running them one by one gives (within float rounding)."""
    feeds = {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
    try:
        together = run_batched(feeds)
    except Exception as error:   # ONNX Runtime's own exception types
        first = str(error).strip().splitlines()[0][:200]
        raise WpkError(f"{label}: its slice does not run on a batch of {len(rows)} "
                       f"({first}); serve it without --max-batch") from None
    alone = [run_single(row) for row in rows]
    for index, value in enumerate(together):
        expected = np.concatenate([outputs[index] for outputs in alone])
        if value.shape != expected.shape or not np.allclose(
                value, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(expected).max(
                    initial=0.0)))):
            raise WpkError(f"{label}: a batch of {len(rows)} does not give what single "
                           f"requests give (output {index}: shape {list(value.shape)} vs "
                           f"{list(expected.shape)}); its slice mixes rows, or fixes the "
                           f"batch size in its graph: serve it without --max-batch")
