"""The Open Inference Protocol servicer of one tier.

Models served:
- `<name>.<tier>` on every tier: the tier's slice alone. Inputs: the tier's `inputs`; outputs:
  its `outputs` (forward + results; passthrough tensors are copied through).
- `<name>` on the entry (first) tier: the whole pipeline. Inputs and outputs: the model's.
- `<name>.<tier>` with request parameter `wpk_pipeline=true` (what a tier sends the next
  one): run the slice, forward `forward` to the next tier, answer `results` merged with the
  next tier's answer. Each tier calls the next with the caller's remaining deadline.

Every tier also serves Triton's system shared-memory extension (see shared_memory): clients on
its host pass inputs and receive outputs through registered /dev/shm regions.
"""
from __future__ import annotations

import asyncio
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from wpk import __version__
from wpk.errors import WpkError, ort_error_line
from wpk.feeds import random_feeds
from wpk.plan import Plan
from wpk.runtime import protocol as pb
from wpk.runtime.client import InferenceClient
from wpk.runtime.frames import MAX_PAYLOAD_BYTES, Frame
from wpk.runtime.link import PIPELINE_PARAM, STATUS_PARAM, TIMEOUT_PARAM
from wpk.runtime.codecs import Codec
from wpk.runtime.metrics import TierMetrics
from wpk.runtime.next_tier import GrpcLink, TcpLink
from wpk.runtime.outbox import Outbox
from wpk.runtime.shared_memory import EXTENSION as SHM_EXTENSION
from wpk.runtime.shared_memory import SharedMemoryRegistry, uses_shared_memory
from wpk.runtime.status import TierError
from wpk.runtime.batching import Batcher, BatchPolicy, check_batched
from wpk.runtime.slice import load_batched_runner, load_runner
from wpk.runtime.link_server import LinkServer, Reply
from wpk.runtime.tensor_link import EXTENSION_PREFIX, LANE_EXTENSION
from wpk.runtime.tensors import TensorError, TensorMeta, dtype_of
from wpk.runtime.wire import (build_response, parameter_value, parse_inputs, payload_bytes,
                              requested_outputs, set_parameter)

LINKS = ("tcp", "grpc")
DEFAULT_HOP_TIMEOUT_S = 60.0    # when the caller sets no deadline
DEADLINE_MARGIN_S = 0.02        # kept back so our own error reaches the caller in time
# `--run auto` (the gRPC path; tensor-link requests always run in their connection's thread):
INLINE_BELOW_S = 0.005          # slices faster than this may run on the event loop:
INLINE_BELOW_CORES = 4          # always where this process has fewer cores than this, else
# only while no other request is in flight. Measured on 2 cores with the tensor link:
# resnet_like's 1.2 ms entry slice inline instead of in a worker thread: per hop -10 %,
# pipelined throughput +8-13 %, entry CPU per request -5-10 %. On 16 cores, always in a
# worker: throughput +20-30 % (the slice overlaps the loop's gRPC work on another core), but
# one request at a time pays the hand-off, ~100 us per hop; "alone" keeps both gains.


def usable_cores() -> int:
    """Cores this process may use: its affinity mask (taskset, a cpuset), capped by a cgroup v2
    CPU quota (`docker --cpus`, Kubernetes limits), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return min(cores, math.ceil(quota)) if quota else cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup v2 `cpu.max` allows (None: no quota, or no
    cgroup v2)."""
    try:
        line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines()
                    if x.startswith("0::"))
        quota, period = (root / line[3:].lstrip("/") / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, StopIteration, ValueError):
        return None


def _call_soon(loop: asyncio.AbstractEventLoop, callback) -> None:
    """`callback` on `loop` from another thread; nothing once the loop has closed."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass


@dataclass(frozen=True)
class ServedModel:
    name: str
    inputs: dict[str, TensorMeta]
    outputs: dict[str, TensorMeta]
    pipeline: bool               # True: the whole pipeline from this tier on


# gRPC requests a tier holds between receipt and answer; beyond it, RESOURCE_EXHAUSTED
DEFAULT_MAX_IN_FLIGHT = 1024


class TierService:
    def __init__(self, plan: Plan, plan_dir: str | Path, tier: str, next_address: str | None,
                 *, name: str | None = None, threads: int = 0, workers: int = 1,
                 hop_timeout: float = DEFAULT_HOP_TIMEOUT_S, run: str = "auto",
                 channel_credentials=None, spin: bool = False, link: str = "tcp",
                 shared_memory: bool = True, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 batching: BatchPolicy | None = None):
        """`link`: "tcp", the tensor link (tensor_link) to the next tier and from the previous
        one; "grpc": gRPC streams only. With TLS (`channel_credentials`) the link is gRPC.
        `shared_memory`: serve Triton's system shared-memory extension (clients on this host
        map /dev/shm objects into the server: off where clients are not trusted).
        `batching`: run requests that arrive together as one batch (see batching.py)."""
        self.plan = plan
        self.tier = plan.tier(tier)
        index = plan.tier_index(tier)
        self.name = name or plan.name
        self.hop_timeout = hop_timeout
        self.channel_credentials = channel_credentials  # TLS to the next tier, if any
        self.metrics = TierMetrics(tier)
        self.shared_memory = SharedMemoryRegistry(f"tier {tier!r}") if shared_memory else None
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
        if link not in LINKS:
            raise WpkError(f"--link {link!r}: expected {' or '.join(LINKS)}")
        self.link_kind = "grpc" if channel_credentials is not None else link
        self.link: GrpcLink | TcpLink | None = None
        self.link_server: LinkServer | None = None
        self.codec = Codec.parse(plan.links[index].codec) if self.next_tier else Codec()
        self.next_model = f"{self.name}.{self.next_tier}" if self.next_tier else ""
        self.entry = index == 0
        self.slice_outputs = list(self.tier.slice_outputs)
        self.models = self._models(index == 0)
        self.slice_seconds = self._warm_up()
        if run not in ("auto", "inline", "thread", "alone"):
            raise WpkError(f"--run {run!r}: expected auto, inline, thread or alone")
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

    def _batch_runner(self, threads: int, spin: bool, plan_dir: str | Path):
        """The slice with a batch dimension, proven to give what single runs give."""
        if self.runner is None:
            raise WpkError(f"tier {self.tier.name!r} runs no slice: --max-batch has nothing "
                           f"to batch")
        runner = load_batched_runner(plan_dir, self.tier, threads, spin)
        specs = {}
        for name in self.tier.slice_inputs:
            meta = self._meta(name)
            if not meta.shape or meta.shape[0] != 1:
                raise WpkError(f"tier {self.tier.name!r}: --max-batch needs slice inputs "
                               f"with a batch dimension of 1, and {name!r} has shape "
                               f"{list(meta.shape)}")
            specs[name] = ([d if d > 0 else 1 for d in meta.shape], dtype_of(meta.datatype))
        rows = [random_feeds(specs, seed) for seed in range(2)]
        check_batched(lambda f: runner.run(self.slice_outputs, f),
                      lambda f: self.runner.run(self.slice_outputs, f), rows,
                      f"tier {self.tier.name!r}")
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
                                   dtype=dtype_of(meta.datatype))
        times = []
        try:
            for _ in range(runs):
                started = time.perf_counter()
                self.runner.run(self.slice_outputs, feeds)
                times.append(time.perf_counter() - started)
        except Exception as error:  # ORT's own exception types
            raise WpkError(f"tier {self.tier.name!r}: slice does not run on inputs of "
                               f"the planned shapes: {error}") from None
        return sorted(times)[len(times) // 2]

    # -- model table ---------------------------------------------------------------------
    def _meta(self, tensor: str) -> TensorMeta:
        spec = self.plan.tensors.get(tensor)
        if spec is None:
            for entry in self.plan.model.get("inputs", []) + self.plan.model.get("outputs", []):
                if entry["name"] == tensor:
                    spec = entry
        if spec is None:
            raise WpkError(f"plan.json: tensor {tensor!r} of tier {self.tier.name!r} is "
                               f"not described in `tensors`")
        return TensorMeta.from_spec(tensor, spec["dtype"], spec["shape"])

    def _models(self, entry: bool) -> dict[str, ServedModel]:
        tier = self.tier
        outputs = list(dict.fromkeys(tier.forward + tier.results))
        models: dict[str, ServedModel] = {}
        if entry:
            model = self.plan.model
            models[self.name] = ServedModel(
                self.name, {t["name"]: self._meta(t["name"]) for t in model["inputs"]},
                {t["name"]: self._meta(t["name"]) for t in model["outputs"]}, pipeline=True)
        models[f"{self.name}.{tier.name}"] = ServedModel(
            f"{self.name}.{tier.name}", {n: self._meta(n) for n in tier.inputs},
            {n: self._meta(n) for n in outputs}, pipeline=False)
        return models

    def _model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise TierError(grpc.StatusCode.NOT_FOUND,
                        f"tier {self.tier.name!r} has no model {name!r} "
                        f"(models: {', '.join(self.models)})")
        return model

    async def start(self, host: str = "127.0.0.1", link_port: int = 0,
                    max_frame_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        """Open the link to the next tier (connected on first use) and, with the tensor link,
        listen for the previous tier's frames (on the entry tier, clients') on
        `host`:`link_port` (0: a free port); a frame over `max_frame_bytes` closes its
        connection."""
        loop = asyncio.get_running_loop()
        self.loop = loop
        if self.batching is not None:
            self.batcher = Batcher(self._run_batch, self.batching, lambda: TierError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"tier {self.tier.name!r}: deadline "
                f"exceeded while waiting for a batch"))
        if self.next_address:
            client = InferenceClient(self.next_address, stream=True,
                                     credentials=self.channel_credentials,
                                     server_name=self.next_tier)
            self.link = GrpcLink(client, self.codec, self.metrics, loop)
            if self.link_kind == "tcp":
                # the entry tier's requests start on the loop: its link is loop-driven
                self.link = TcpLink(self.next_address, self.link, self.codec, self.metrics,
                                    on_loop=self.entry)
        if self.link_kind == "tcp":  # the entry tier too: clients on its host (see link_client)
            try:
                self.link_server = LinkServer(host, link_port, self.serve_frame,
                                              max_payload=max_frame_bytes,
                                              where=f"tier {self.tier.name!r}",
                                              lanes=self.shared_memory is not None)
            except OSError as error:
                raise WpkError(f"tier {self.tier.name!r}: cannot listen for the tensor link "
                               f"on {host}:{link_port} ({error.strerror})") from None

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.link_server is not None:
            self.link_server.close()
        if self.link is not None:
            await self.link.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.shared_memory is not None:
            self.shared_memory.close()

    # -- health and metadata -----------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self.models)

    async def ServerMetadata(self, request, context):
        extensions = [SHM_EXTENSION] if self.shared_memory is not None else []
        if self.link_server:
            extensions.append(f"{EXTENSION_PREFIX}{self.link_server.port}")
            if self.link_server.lanes:
                extensions.append(LANE_EXTENSION)
        return pb.ServerMetadataResponse(name=f"wpk ({self.name}.{self.tier.name})",
                                         version=__version__, extensions=extensions)

    async def ModelMetadata(self, request, context):
        try:
            model = self._model(request.name)
        except TierError as abort:
            await context.abort(abort.code, abort.details)
        response = pb.ModelMetadataResponse(name=model.name, versions=["1"],
                                            platform="onnxruntime_onnx")
        for target, metas in ((response.inputs, model.inputs), (response.outputs, model.outputs)):
            for meta in metas.values():
                target.add(name=meta.name, datatype=meta.datatype, shape=meta.shape)
        return response

    # -- shared memory (Triton's extension; see shared_memory) ---------------------------
    async def _shared_memory(self, context) -> SharedMemoryRegistry:
        if self.shared_memory is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"tier {self.tier.name!r}: system shared memory is disabled "
                                f"on this server (--no-shared-memory)")
        return self.shared_memory

    async def SystemSharedMemoryRegister(self, request, context):
        registry = await self._shared_memory(context)
        try:
            registry.register(request.name, request.key, request.offset, request.byte_size)
        except TierError as error:
            await context.abort(error.code, error.details)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryStatus(self, request, context):
        registry = await self._shared_memory(context)
        try:
            regions = registry.status(request.name)
        except TierError as error:
            await context.abort(error.code, error.details)
        response = pb.SystemSharedMemoryStatusResponse()
        for region in regions:
            status = response.regions[region.name]
            status.name, status.key = region.name, region.key
            status.offset, status.byte_size = region.offset, region.byte_size
        return response

    async def SystemSharedMemoryUnregister(self, request, context):
        (await self._shared_memory(context)).unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def _no_cuda(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"tier {self.tier.name!r}: CUDA shared memory is not supported by "
                            f"wpk tiers; use system shared memory")

    CudaSharedMemoryStatus = CudaSharedMemoryRegister = CudaSharedMemoryUnregister = _no_cuda

    # -- inference ---------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await self._infer(request, context.time_remaining())
        except TierError as abort:
            code = abort.code
            await context.abort(abort.code, abort.details)
        finally:
            self.metrics.observe(request.model_name, code.name, time.perf_counter() - started)

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming inference: each request runs concurrently; answers carry its id
        and are written in the order they are ready (see outbox)."""
        running: set[asyncio.Task] = set()
        outbox = Outbox(context.write, lambda error: None)  # a failed write: the caller has
        # gone, nobody is left to answer

        async def answer(request) -> None:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                param = request.parameters.get(TIMEOUT_PARAM)
                remaining = parameter_value(param) / 1000.0 if param is not None else None
                message = await self._infer(request, remaining, stream=True)
            except Exception as error:  # every request gets an answer, whatever went wrong
                abort = error if isinstance(error, TierError) else TierError(
                    grpc.StatusCode.INTERNAL, f"tier {self.tier.name!r}: {error!r}")
                code = abort.code
                message = pb.ModelStreamInferResponse(error_message=abort.details)
                message.infer_response.id = request.id
                message.infer_response.model_name = request.model_name
                set_parameter(message.infer_response.parameters, STATUS_PARAM, code.value[0])
            self.metrics.observe(request.model_name, code.name, time.perf_counter() - started)
            await outbox.send(message)

        try:
            async for request in request_iterator:
                task = asyncio.ensure_future(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            await outbox.flush()
        finally:
            for task in running:
                task.cancel()
            outbox.cancel()

    async def _infer(self, request, remaining: float | None, stream: bool = False):
        """One inference; raises TierError with the status and message the caller gets.
        `remaining`: seconds left of the caller's deadline (None: no deadline)."""
        model_name = request.model_name
        deadline = None if remaining is None else time.monotonic() + remaining
        if self.in_flight >= self.max_in_flight:
            raise TierError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"tier {self.tier.name!r}: {self.in_flight} requests in flight, the "
                        f"most it holds (wpk-serve --max-in-flight); retry later")
        self.in_flight += 1
        try:
            self.metrics.add_bytes("in", payload_bytes(request))
            model = self._model(model_name)
            pipeline = model.pipeline or self._wants_pipeline(request)
            arrays = parse_inputs(request, model_name, model.inputs, self.shared_memory)
            targets = self._output_targets(request, model_name) if request.outputs else {}
            if pipeline:
                produced = await self._run_pipeline(arrays, deadline)
                if model.pipeline:
                    produced = self._in_order(model, produced)
                    if isinstance(produced, TierError):
                        raise produced
                available = list(produced)
            else:
                produced = await self._run_slice(arrays, deadline)
                available = list(model.outputs)
            names = requested_outputs(request, model_name, available)
            in_shared_memory = {}
            if targets:
                self.shared_memory.write_outputs(model_name, targets, produced)
                in_shared_memory = {o.name: o.parameters for o in request.outputs
                                    if o.name in targets}
            response = build_response(model_name, {n: produced[n] for n in names}, request.id,
                                      stream=stream, in_shared_memory=in_shared_memory)
            self.metrics.add_bytes("out", payload_bytes(response))
            return response
        except TensorError as error:
            raise TierError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        finally:
            self.in_flight -= 1

    def _output_targets(self, request, model_name: str) -> dict:
        """Requested outputs to write into shared memory (see shared_memory)."""
        if self.shared_memory is not None:
            return self.shared_memory.output_targets(request, model_name)
        if any(uses_shared_memory(o.parameters) for o in request.outputs):
            raise TensorError(f"model {model_name!r}: an output names a shared memory region, "
                              f"but shared memory is disabled on this server")
        return {}

    @staticmethod
    def _wants_pipeline(request) -> bool:
        param = request.parameters.get(PIPELINE_PARAM)
        return bool(param is not None and parameter_value(param))

    async def _run_slice(self, arrays: dict[str, np.ndarray],
                         deadline: float | None = None) -> dict[str, np.ndarray]:
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

    async def _run_batch(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batched slice run, in a worker (the loop keeps collecting the next batch)."""
        def run() -> dict[str, np.ndarray]:
            started = time.monotonic()
            try:
                values = self.batch_runner.run(self.slice_outputs, feeds)
            except Exception as error:  # ORT's own exception types
                raise TierError(grpc.StatusCode.INTERNAL, f"tier {self.tier.name!r}: slice failed "
                            f"on a batch: {ort_error_line(error)}") from None
            self.metrics.observe_slice(time.monotonic() - started)
            self.metrics.observe_batch(next(iter(feeds.values())).shape[0])
            return dict(zip(self.slice_outputs, values))
        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    def _slice(self, arrays: dict[str, np.ndarray],
               deadline: float | None = None) -> dict[str, np.ndarray]:
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
                        f"tier {self.tier.name!r}: deadline exceeded before its slice ran")
        try:
            values = self.runner.run(self.slice_outputs, feeds)
        except Exception as error:  # ORT's own exception types
            raise TierError(grpc.StatusCode.INTERNAL,
                        f"tier {self.tier.name!r}: slice failed: {ort_error_line(error)}"
                        ) from None
        self.metrics.observe_slice(time.monotonic() - started)
        produced.update(zip(self.slice_outputs, values))
        return produced

    def _hop_timeout(self, deadline: float | None) -> float:
        """Seconds the next tier gets: what is left of the deadline after this tier's slice,
        less a margin so that our own error reaches the caller first."""
        if deadline is None:
            return self.hop_timeout
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TierError(grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"tier {self.tier.name!r}: deadline exceeded after its slice, before "
                        f"forwarding to tier {self.next_tier!r}")
        return max(remaining - min(DEADLINE_MARGIN_S, remaining * 0.1), 0.0)

    async def _run_pipeline(self, arrays: dict[str, np.ndarray],
                            deadline: float | None) -> dict[str, np.ndarray]:
        results, forward = self._split(await self._run_slice(arrays, deadline))
        if forward is None:
            return results
        timeout = self._hop_timeout(deadline)
        assert self.link is not None
        try:
            answer = await self.link.forward(self.next_model, forward, timeout)
        except TierError as error:
            raise self._forward_error(error, timeout) from None
        results.update(answer)
        return results

    def _split(self, produced: dict[str, np.ndarray]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """The slice's outputs this tier answers itself, and those it forwards to the next
        tier (None where it is the last)."""
        results = {n: produced[n] for n in self.tier.results}
        if not self.tier.forward:
            return results, None
        return results, {n: produced[n] for n in self.tier.forward}

    def _in_order(self, model: ServedModel, produced: dict[str, np.ndarray]
                  ) -> dict[str, np.ndarray] | TierError:
        """The pipeline model's outputs, in the model's order (or INTERNAL if one is
        missing), over gRPC and the tensor link alike."""
        missing = [n for n in model.outputs if n not in produced]
        if missing:
            return TierError(grpc.StatusCode.INTERNAL, f"tier {self.tier.name!r}: the pipeline "
                         f"produced no {', '.join(missing)}")
        return {n: produced[n] for n in model.outputs}

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
            return TierError(grpc.StatusCode.INTERNAL, f"{where} rejected what tier "
                         f"{self.tier.name!r} forwarded: {error.details}")
        # a message from further down already names its tier; keep its status code
        details = error.details
        return TierError(status, details if "tier '" in details else f"{where}: {details}")

    # -- the tensor link (from the previous tier, or a client) -------------------------------
    def serve_frame(self, frame: Frame, reply: Reply) -> None:
        """One request from the tensor link, in the connection's thread: run the slice here,
        forward from here, answer from whichever thread has the answer. A tier's request
        runs the pipeline from here; a client's ("k", see frames) is answered as ModelInfer
        would answer it: a slice model with its slice's outputs, the pipeline model with
        the model's outputs in their order."""
        started = time.perf_counter()
        model_name = str(frame.meta.get("m", ""))
        kserve = bool(frame.meta.get("k"))
        deadline = time.monotonic() + frame.timeout_ms / 1000.0 if frame.timeout_ms >= 0 \
            else None

        def finish(outcome: dict[str, np.ndarray] | TierError) -> None:
            if isinstance(outcome, TierError):
                code = outcome.code
                reply.fail(code, outcome.details)
            else:
                code = grpc.StatusCode.OK
                self.metrics.add_bytes("out", reply.ok(outcome))
            self.metrics.observe(model_name, code.name, time.perf_counter() - started)

        try:
            self.metrics.add_bytes("in", frame.nbytes)
            model = self._model(model_name)
            arrays = frame.arrays(model_name, model.inputs)
            if self.batcher is not None:   # this connection's thread waits for its batch
                produced = asyncio.run_coroutine_threadsafe(
                    self._run_slice(arrays, deadline), self.loop).result()
            else:
                produced = self._slice(arrays, deadline)
            if kserve and not model.pipeline:
                return finish({n: produced[n] for n in model.outputs})
            results, forward = self._split(produced)
            ordered = model.pipeline   # (a client's request for a slice model ended above)
            if forward is None:
                return finish(self._in_order(model, results) if ordered else results)
            timeout = self._hop_timeout(deadline)

            def answered(outcome) -> None:
                if isinstance(outcome, TierError):
                    return finish(self._forward_error(outcome, timeout))
                results.update(outcome)
                finish(self._in_order(model, results) if ordered else results)

            assert self.link is not None
            self.link.submit(self.next_model, forward, timeout, answered)
        except TierError as abort:
            finish(abort)
        except TensorError as error:
            finish(TierError(grpc.StatusCode.INVALID_ARGUMENT, str(error)))
        except Exception as error:  # every request gets an answer, whatever went wrong
            finish(TierError(grpc.StatusCode.INTERNAL, f"tier {self.tier.name!r}: {error!r}"))
