"""`TierCore`: one tier without its transports (KServe's DataPlane, for a slice of a plan).

It owns the slice (warmed up, placed on the event loop or a worker, batched), the models the
tier serves, the forward to the next tier (a `NextTier`), deadlines, codecs and metrics.
Transports are thin adapters over it: the KServe gRPC servicer (kserve_servicer), the tensor
link's frame handler (link_handler); both call `infer` (on the loop) or `infer_here` (from a
connection's thread) with arrays and a deadline, and get arrays or a `TierError`.

Models served:
- `<name>.<tier>` on every tier: the tier's slice alone. Inputs: the tier's `inputs`; outputs:
  its `outputs` (forward + results; passthrough tensors are copied through).
- `<name>` on the entry (first) tier: the whole pipeline. Inputs and outputs: the model's.
- `<name>.<tier>` run as a pipeline (what a tier sends the next one): run the slice, forward
  `forward` to the next tier, answer `results` merged with the next tier's answer. Each tier
  calls the next with the caller's remaining deadline, less a margin.
"""
from __future__ import annotations

import asyncio
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import numpy as np

from wpk.errors import WpkError, ort_error_line, refuse_unknown_choice
from wpk.feeds import random_feeds
from wpk.plan import Plan
from wpk.runtime.batching import Batcher, BatchPolicy, check_batched
from wpk.runtime.codecs import Codec
from wpk.runtime.cpus import usable_cores
from wpk.runtime.metrics import TierMetrics
from wpk.runtime.client import InferenceClient
from wpk.runtime.next_tier import GrpcLink, NextTier, TcpLink, link_kind
from wpk.runtime.slice import load_batched_runner, load_runner
from wpk.runtime.status import TierError, failure
from wpk.runtime.tensors import served_spec
from wpk.tensor_spec import TensorSpec

Arrays = dict[str, np.ndarray]
DEFAULT_HOP_TIMEOUT_S = 60.0    # when the caller sets no deadline
DEADLINE_MARGIN_S = 0.02        # kept back so our own error reaches the caller in time
DEFAULT_MAX_IN_FLIGHT = 1024    # gRPC requests held between receipt and answer; beyond it,
# RESOURCE_EXHAUSTED
# `--run auto` (the gRPC path; tensor-link requests always run in their connection's thread):
INLINE_BELOW_S = 0.005          # slices faster than this may run on the event loop:
INLINE_BELOW_CORES = 4          # always where this process has fewer cores than this, else
# only while no other request is in flight. Measured on 2 cores with the tensor link:
# resnet_like's 1.2 ms entry slice inline instead of in a worker thread: per hop -10 %,
# pipelined throughput +8-13 %, entry CPU per request -5-10 %. On 16 cores, always in a
# worker: throughput +20-30 % (the slice overlaps the loop's gRPC work on another core), but
# one request at a time pays the hand-off, ~100 us per hop; "alone" keeps both gains.


def _call_soon(loop: asyncio.AbstractEventLoop, callback) -> None:
    """`callback` on `loop` from another thread; nothing once the loop has closed."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass


@dataclass(frozen=True)
class ServedModel:
    name: str
    inputs: dict[str, TensorSpec]     # -1 marks a dimension of any size
    outputs: dict[str, TensorSpec]
    pipeline: bool               # True: the whole pipeline from this tier on


class TierCore:
    def __init__(self, plan: Plan, plan_dir: str | Path, tier: str, next_address: str | None,
                 *, name: str | None = None, threads: int = 0, workers: int = 1,
                 hop_timeout: float = DEFAULT_HOP_TIMEOUT_S, run: str = "auto",
                 channel_credentials=None, spin: bool = False, link: str = "tcp",
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 batching: BatchPolicy | None = None):
        """`link`: "tcp", the tensor link to the next tier (and from the previous one, see
        server); with TLS (`channel_credentials`) it is gRPC (see next_tier.link_kind).
        `batching`: run requests that arrive together as one batch (see batching.py)."""
        self.plan = plan
        self.tier = plan.tier(tier)
        index = plan.tier_index(tier)
        self.name = name or plan.name
        self.where = f"tier {tier!r}"
        self.hop_timeout = hop_timeout
        self.channel_credentials = channel_credentials  # TLS to the next tier, if any
        self.metrics = TierMetrics(tier)
        self.runner = load_runner(plan_dir, self.tier, threads, spin) if self.tier.slice else None
        self.executor = ThreadPoolExecutor(max_workers=max(1, workers),
                                           thread_name_prefix=f"wpk-{tier}")
        self.next_tier = plan.tiers[index + 1].name if index + 1 < len(plan.tiers) else None
        if self.tier.forward and self.next_tier is None:
            raise WpkError(f"tier {tier!r} forwards tensors but is the last tier")
        if self.tier.forward and not next_address:
            raise WpkError(f"tier {tier!r} forwards {', '.join(self.tier.forward)} to "
                           f"tier {self.next_tier!r}: give its address with --next HOST:PORT")
        if next_address and not self.tier.forward:
            warnings.warn(f"tier {tier!r} forwards nothing to a next tier: --next "
                          f"{next_address} is not used")
        self.next_address = next_address if self.tier.forward else None
        self.link_kind = link_kind(link, channel_credentials is not None)
        self.link: NextTier | None = None
        self.codec = Codec.parse(plan.links[index].codec) if self.next_tier else Codec()
        self.next_model = f"{self.name}.{self.next_tier}" if self.next_tier else ""
        self.entry = index == 0
        self.slice_outputs = list(self.tier.slice_outputs)
        self.models = self._models(self.entry)
        self.slice_seconds = self._warm_up()
        refuse_unknown_choice(run, ("auto", "inline", "thread", "alone"), "run placement")
        self.placement = self._placement(run)
        self.in_flight = 0   # gRPC requests between receipt and answer
        self.max_in_flight = max_in_flight
        self.in_worker = 0   # slices handed to the worker and not finished (a request that
        # gave up on its slice leaves it running there)
        self.slice_runs = {"loop": 0, "worker": 0}   # where the gRPC path's slices ran
        self.batching = batching if batching is not None and batching.max_batch > 1 else None
        self.batch_runner = self._batch_runner(threads, spin, plan_dir) if self.batching \
            else None
        self.batcher: Batcher | None = None     # made in start(), on the event loop
        self.serving = False   # health: from start() until the server begins to stop

    # -- the slice, loaded and proven ------------------------------------------------------
    def _batch_runner(self, threads: int, spin: bool, plan_dir: str | Path):
        """The slice with a batch dimension, proven to give what single runs give."""
        if self.runner is None:
            raise WpkError(f"{self.where} runs no slice: --max-batch has nothing to batch")
        runner = load_batched_runner(plan_dir, self.tier, threads, spin)
        specs = {}
        for name in self.tier.slice_inputs:
            meta = self._meta(name)
            if not meta.shape or meta.shape[0] != 1:
                raise WpkError(f"{self.where}: --max-batch needs slice inputs with a batch "
                               f"dimension of 1, and {name!r} has shape {list(meta.shape)}")
            specs[name] = ([d if d > 0 else 1 for d in meta.shape], meta.numpy_dtype)
        rows = [random_feeds(specs, seed) for seed in range(2)]
        check_batched(lambda f: runner.run(self.slice_outputs, f),
                      lambda f: self.runner.run(self.slice_outputs, f), rows, self.where)
        return runner

    def _placement(self, run: str) -> str:
        """Where the slice runs: "inline" on the event loop, "thread" in a worker, "alone" on
        the loop while it is the only request in flight. Inline saves the thread hand-off
        (~50-100 us) but blocks the loop while the slice runs: worth it for fast slices, and
        with cores to spare only when no other request needs the loop meanwhile."""
        if run != "auto":
            return run
        if self.slice_seconds >= INLINE_BELOW_S:
            return "thread"
        return "inline" if usable_cores() < INLINE_BELOW_CORES else "alone"

    def _warm_up(self, runs: int = 5) -> float:
        """Run the slice on zeros a few times (first runs are slow); median seconds per run."""
        if self.runner is None:
            return 0.0
        feeds = {}
        for name in self.tier.slice_inputs:
            meta = self._meta(name)
            feeds[name] = np.zeros([d if d > 0 else 1 for d in meta.shape],
                                   dtype=meta.numpy_dtype)
        times = []
        try:
            for _ in range(runs):
                started = time.perf_counter()
                self.runner.run(self.slice_outputs, feeds)
                times.append(time.perf_counter() - started)
        except Exception as error:  # ORT's own exception types
            raise WpkError(f"{self.where}: slice does not run on inputs of the planned "
                           f"shapes: {error}") from None
        return sorted(times)[len(times) // 2]

    # -- model table ---------------------------------------------------------------------
    def _meta(self, tensor: str) -> TensorSpec:
        spec = self.plan.tensors.get(tensor)
        if spec is None:
            for entry in self.plan.model.inputs + self.plan.model.outputs:
                if entry.name == tensor:
                    spec = entry
        if spec is None:
            raise WpkError(f"plan.json: tensor {tensor!r} of {self.where} is not described "
                           f"in `tensors`")
        return served_spec(tensor, spec.dtype, spec.shape)

    def _models(self, entry: bool) -> dict[str, ServedModel]:
        tier = self.tier
        outputs = list(dict.fromkeys(tier.forward + tier.results))
        models: dict[str, ServedModel] = {}
        if entry:
            model = self.plan.model
            models[self.name] = ServedModel(
                self.name, {t.name: self._meta(t.name) for t in model.inputs},
                {t.name: self._meta(t.name) for t in model.outputs}, pipeline=True)
        models[f"{self.name}.{tier.name}"] = ServedModel(
            f"{self.name}.{tier.name}", {n: self._meta(n) for n in tier.inputs},
            {n: self._meta(n) for n in outputs}, pipeline=False)
        return models

    def model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise TierError(grpc.StatusCode.NOT_FOUND, f"{self.where} has no model {name!r} "
                                                       f"(models: {', '.join(self.models)})")
        return model

    # -- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        """On the serving loop: the batcher, and the link to the next tier (connected on
        first use)."""
        self.loop = asyncio.get_running_loop()
        if self.batching is not None:
            self.batcher = Batcher(self._run_batch, self.batching, lambda: TierError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.where}: deadline exceeded while "
                f"waiting for a batch"))
        if self.next_address:
            client = InferenceClient(self.next_address, credentials=self.channel_credentials,
                                     server_name=self.next_tier)
            self.link = GrpcLink(client, self.codec, self.metrics, self.loop)
            if self.link_kind == "tcp":
                self.link = TcpLink(self.next_address, self.link, self.codec, self.metrics)
        self.serving = True

    async def stop(self) -> None:
        self.serving = False
        if self.batcher is not None:
            await self.batcher.stop()
        if self.link is not None:
            await self.link.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def admit(self) -> None:
        """Count a gRPC request in; RESOURCE_EXHAUSTED beyond --max-in-flight (the caller
        calls `in_flight -= 1` when it has answered)."""
        if self.in_flight >= self.max_in_flight:
            raise TierError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{self.where}: {self.in_flight} requests in flight, the most it "
                            f"holds (wpk-serve --max-in-flight); retry later")
        self.in_flight += 1

    # -- inference -------------------------------------------------------------------------
    async def infer(self, model: ServedModel, arrays: Arrays, deadline: float | None,
                    pipeline: bool) -> Arrays:
        """On the loop: `model` on `arrays`; with `pipeline`, forward and merge the next
        tier's answer. `deadline`: time.monotonic() (None: none). Raises TierError."""
        produced = await self._run_slice(arrays, deadline)
        if not pipeline:
            return {n: produced[n] for n in model.outputs}
        results, forward = self._split(produced)
        if forward is not None:
            timeout = self._hop_timeout(deadline)
            assert self.link is not None
            try:
                results.update(await self.link.forward(self.next_model, forward, timeout))
            except TierError as error:
                raise self._forward_error(error, timeout) from None
        return self._answer(model, results)

    def infer_here(self, model: ServedModel, arrays: Arrays, deadline: float | None,
                   pipeline: bool, done: Callable[[Arrays | TierError], None]) -> None:
        """`infer` from a connection's thread: the slice runs in it, the forward leaves from
        it, `done` gets the outcome from whichever thread has it. A batching tier instead
        hands the request to the loop and returns at once, so that the connection's next
        requests join the same batch (one upstream tier sends all its requests over one
        connection)."""
        if self.batcher is not None:
            return self._infer_on_loop(model, arrays, deadline, pipeline, done)
        produced = self._slice(arrays, deadline)
        if not pipeline:
            return done({n: produced[n] for n in model.outputs})
        results, forward = self._split(produced)
        if forward is None:
            return done(self._outcome(model, results))
        timeout = self._hop_timeout(deadline)

        def answered(outcome: Arrays | TierError) -> None:
            if isinstance(outcome, TierError):
                return done(self._forward_error(outcome, timeout))
            results.update(outcome)
            done(self._outcome(model, results))

        assert self.link is not None
        self.link.submit(self.next_model, forward, timeout, answered)

    def _infer_on_loop(self, model: ServedModel, arrays: Arrays, deadline: float | None,
                       pipeline: bool, done: Callable[[Arrays | TierError], None]) -> None:
        def finished(running) -> None:
            error = running.exception()
            if error is None:
                return done(running.result())
            done(failure(error, self.where))

        asyncio.run_coroutine_threadsafe(self.infer(model, arrays, deadline, pipeline),
                                         self.loop).add_done_callback(finished)

    async def _run_slice(self, arrays: Arrays, deadline: float | None = None) -> Arrays:
        """Slice outputs plus the tier's inputs (passthrough tensors), on the loop or in a
        worker (see `_placement`)."""
        if self.runner is None:
            return self._slice(arrays, deadline)
        if self.batcher is not None:
            produced = dict(arrays)
            produced.update(await self.batcher.run({n: arrays[n] for n in self.tier.slice_inputs},
                                                   deadline))
            return produced
        if self.placement == "inline" or (self.placement == "alone" and self.in_flight <= 1
                                          and self.in_worker == 0):
            self.slice_runs["loop"] += 1
            return self._slice(arrays, deadline)
        self.slice_runs["worker"] += 1
        loop = asyncio.get_running_loop()
        self.in_worker += 1
        running = self.executor.submit(self._slice, arrays, deadline)
        running.add_done_callback(lambda _: _call_soon(loop, self._worker_done))
        return await asyncio.wrap_future(running)

    def _worker_done(self) -> None:
        self.in_worker -= 1

    async def _run_batch(self, feeds: Arrays) -> Arrays:
        """One batched slice run, in a worker (the loop keeps collecting the next batch)."""
        def run() -> Arrays:
            started = time.monotonic()
            try:
                values = self.batch_runner.run(self.slice_outputs, feeds)
            except Exception as error:  # ORT's own exception types
                raise TierError(grpc.StatusCode.INTERNAL, f"{self.where}: slice failed on a "
                                f"batch: {ort_error_line(error)}") from None
            self.metrics.observe_slice(time.monotonic() - started)
            self.metrics.observe_batch(next(iter(feeds.values())).shape[0])
            return dict(zip(self.slice_outputs, values))
        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    def _slice(self, arrays: Arrays, deadline: float | None = None) -> Arrays:
        """Run the slice in this thread. A request whose `deadline` (time.monotonic()) has
        passed when its slice would start (it may have waited for a worker) is not run:
        nobody is left to use the answer."""
        produced = dict(arrays)
        if self.runner is None:
            return produced
        feeds = {n: arrays[n] for n in self.tier.slice_inputs}
        started = time.monotonic()
        if deadline is not None and started >= deadline:
            raise TierError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"{self.where}: deadline exceeded before its slice ran")
        try:
            values = self.runner.run(self.slice_outputs, feeds)
        except Exception as error:  # ORT's own exception types
            raise TierError(grpc.StatusCode.INTERNAL,
                            f"{self.where}: slice failed: {ort_error_line(error)}") from None
        self.metrics.observe_slice(time.monotonic() - started)
        produced.update(zip(self.slice_outputs, values))
        return produced

    # -- deadlines and the next tier -------------------------------------------------------
    def _hop_timeout(self, deadline: float | None) -> float:
        """Seconds the next tier gets: what is left of the deadline after this tier's slice,
        less a margin so that our own error reaches the caller first."""
        if deadline is None:
            return self.hop_timeout
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TierError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"{self.where}: deadline exceeded after its slice, before "
                            f"forwarding to tier {self.next_tier!r}")
        return max(remaining - min(DEADLINE_MARGIN_S, remaining * 0.1), 0.0)

    def _split(self, produced: Arrays) -> tuple[Arrays, Arrays | None]:
        """The slice's outputs this tier answers itself, and those it forwards to the next
        tier (None where it is the last)."""
        results = {n: produced[n] for n in self.tier.results}
        if not self.tier.forward:
            return results, None
        return results, {n: produced[n] for n in self.tier.forward}

    def _answer(self, model: ServedModel, results: Arrays) -> Arrays:
        """A pipeline's answer: for the pipeline model, its outputs in the model's order
        (INTERNAL if one is missing); for a slice model, whatever the pipeline produced."""
        if not model.pipeline:
            return results
        missing = [n for n in model.outputs if n not in results]
        if missing:
            raise TierError(grpc.StatusCode.INTERNAL, f"{self.where}: the pipeline produced "
                                                      f"no {', '.join(missing)}")
        return {n: results[n] for n in model.outputs}

    def _outcome(self, model: ServedModel, results: Arrays) -> Arrays | TierError:
        try:
            return self._answer(model, results)
        except TierError as error:
            return error

    def _forward_error(self, error: TierError, timeout: float) -> TierError:
        """What the caller gets when the next tier failed: the status, naming the tier."""
        where = f"tier {self.next_tier!r} at {self.next_address}"
        status = error.code
        if status == grpc.StatusCode.DEADLINE_EXCEEDED:
            return TierError(status, f"deadline exceeded waiting for {where} "
                                     f"(after {timeout * 1000:.0f} ms)")
        if status == grpc.StatusCode.UNAVAILABLE:
            return TierError(status, f"{where} is unavailable: {error.details}")
        if status == grpc.StatusCode.CANCELLED:
            return TierError(status, f"call to {where} was cancelled")
        if status in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            # not the caller's fault: the tiers disagree (different plans deployed?)
            return TierError(grpc.StatusCode.INTERNAL, f"{where} rejected what "
                             f"{self.where} forwarded: {error.details}")
        # a message from further down already names its tier; keep its status code
        details = error.details
        return TierError(status, details if "tier '" in details else f"{where}: {details}")
