"""Fixtures: plan directories cut from the example models, and tier servers on 127.0.0.1.

`pipeline(plan_dir)` starts every tier of a plan as real grpc.aio servers (ephemeral ports)
on one event loop in a background thread; the test talks to them over TCP like any client.
"""
from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from wpk.examples import mlp, random_dag, resnet_like
from wpk.partitioner.api import partition
from wpk.plan import load_plan
from wpk.runtime.server import serve

# Every tier is the same hardware, links are fast: the pins alone decide the cuts.
ONE_MACHINE_TIERS = Path(__file__).parents[2] / "examples" / "one-machine.yaml"


def make_plan(model: onnx.ModelProto, directory: Path, pins: dict[str, str],
              codecs: list[str] | None = None, deliver_to: str | None = None) -> Path:
    """A plan written by the partitioner (pins force the cuts), with link codecs."""
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / f"{model.graph.name}.onnx"
    onnx.save(model, str(model_path))
    links = ("device-edge", "edge-cloud")
    partition(model_path, tiers_file=ONE_MACHINE_TIERS, objective="throughput", pins=pins,
              codecs=[f"{link}={codec}" for link, codec in zip(links, codecs or ())],
              out_dir=directory, use_calibration=False, deliver_to=deliver_to)
    assert [t.name for t in load_plan(directory).tiers] == ["device", "edge", "cloud"]
    return directory


def fake_tier(servicer, workers: int = 2):
    """A started gRPC server answering the KServe v2 service with `servicer`'s methods (a
    stand-in for a misbehaving downstream tier); returns (server, address)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from wpk.runtime import protocol as pb

    server = grpc.server(ThreadPoolExecutor(workers))
    server.add_generic_rpc_handlers((pb.generic_handler(servicer),))
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    return server, address


class GrpcOnly:
    """Another KServe v2 server in front of a tier (as Triton would be): it forwards what it
    is asked and advertises no tensor link, so tiers and clients reach it over gRPC."""

    def __init__(self, target: str):
        import grpc

        from wpk.runtime import protocol as pb
        from wpk.runtime.client import channel_options

        self.pb = pb
        self.channel = grpc.insecure_channel(target, options=channel_options())
        self.stub = pb.Stub(self.channel)
        self.server, self.address = fake_tier(self, workers=8)

    def ServerMetadata(self, request, context):
        return self.pb.ServerMetadataResponse(name="grpc only")   # no wpk-tensor-link:PORT

    def ModelInfer(self, request, context):
        import grpc

        from wpk.runtime.zero_copy_messages import Received

        if isinstance(request, Received):   # raw contents as received: put them back
            whole = self.pb.ModelInferRequest()
            whole.CopyFrom(request.message)
            whole.raw_input_contents.extend(bytes(b) for b in request.raw_input_contents)
            request = whole
        try:
            return self.stub.ModelInfer(request, timeout=context.time_remaining())
        except grpc.RpcError as error:
            context.abort(error.code(), error.details())

    def _forwarded(method: str):
        return lambda self, request, context: getattr(self.stub, method)(request, timeout=5)

    ServerLive, ServerReady = _forwarded("ServerLive"), _forwarded("ServerReady")
    ModelReady, ModelMetadata = _forwarded("ModelReady"), _forwarded("ModelMetadata")

    def close(self):
        self.server.stop(0)
        self.channel.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pipeline:
    """All tiers of a plan served in-process; `.address[tier]`, `.entry`, `.stop_tier()`."""

    def __init__(self, plan_dir: Path, *, hop_timeout: float = 5.0,
                 next_override: dict[str, str] | None = None, metrics: bool = False,
                 link: str | dict[str, str] = "tcp", tls_dir: Path | None = None,
                 run: str = "auto", batching: dict | None = None,
                 grpc_only: tuple[str, ...] = ()):
        """`link`: every tier's `--link`, or one per tier name (tcp where not named);
        `run`: every tier's `--run`; `batching`: a BatchPolicy by tier name; `grpc_only`:
        tiers the previous tier reaches through a `GrpcOnly` server (no tensor link)."""
        self.plan_dir = plan_dir
        self.plan = load_plan(plan_dir)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.address: dict[str, str] = {}
        self.metrics_url: dict[str, str] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self.link = link if isinstance(link, dict) else {t.name: link for t in self.plan.tiers}
        self.tls_dir = tls_dir
        self.run = run
        self.batching = batching or {}
        self.services: dict[str, object] = {}   # tier -> its TierCore (to look inside)
        self.link_servers: dict[str, object] = {}   # tier -> its LinkServer (None: TLS)
        self.grpc_only = {tier: None for tier in grpc_only}   # tier -> its GrpcOnly
        self._run(self._start(hop_timeout, next_override or {}, metrics))

    def _run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self, hop_timeout: float, next_override: dict[str, str],
                     metrics: bool) -> None:
        next_address = None
        for tier in reversed(self.plan.tiers):
            ready, stop = asyncio.Event(), asyncio.Event()
            lines: list[str] = []
            task = asyncio.ensure_future(serve(
                str(self.plan_dir), tier.name, port=0,
                next_address=next_override.get(tier.name, next_address), threads=1,
                hop_timeout=hop_timeout, metrics_port=0 if metrics else None, run=self.run,
                link=self.link.get(tier.name, "tcp"), tls_dir=str(self.tls_dir) if self.tls_dir else None,
                batching=self.batching.get(tier.name), ready=ready, stop=stop,
                announce=lines.append))
            done, _ = await asyncio.wait([task, asyncio.ensure_future(ready.wait())],
                                         return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()  # raises the start-up error
            self.address[tier.name] = f"127.0.0.1:{ready.port}"
            self.services[tier.name] = ready.service
            self.link_servers[tier.name] = ready.link_server
            if metrics:
                self.metrics_url[tier.name] = lines[0].split(" metrics ")[1].split()[0]
            self._stops[tier.name], self._tasks[tier.name] = stop, task
            next_address = self.address[tier.name]
            if tier.name in self.grpc_only:
                self.grpc_only[tier.name] = GrpcOnly(next_address)
                next_address = self.grpc_only[tier.name].address

    @property
    def entry(self) -> str:
        return self.address[self.plan.tiers[0].name]

    async def _stop(self, tiers: list[str]) -> None:
        for tier in tiers:
            self._stops[tier].set()
        for tier in tiers:
            await self._tasks.pop(tier)
            self._stops.pop(tier)

    def stop_tier(self, tier: str) -> None:
        self._run(self._stop([tier]))

    def close(self) -> None:
        for proxy in self.grpc_only.values():
            proxy.close()
        self._run(self._stop(list(self._tasks)))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def plans(tmp_path_factory) -> dict[str, Path]:
    """Three-tier plans from wpk.partitioner: resnet (a passthrough crosses the edge), mlp (a
    chain), dag (model outputs produced on every tier), resnet with lossy link codecs."""
    root = tmp_path_factory.mktemp("plans")
    resnet = resnet_like(image_size=32, width=8, classes=10)
    resnet_pins = {"conv_12": "device", "relu_13": "edge", "add_17": "cloud"}
    return {
        "resnet": make_plan(resnet, root / "resnet", resnet_pins),
        "mlp": make_plan(mlp(features=256, hidden=(128, 64, 32), classes=10), root / "mlp",
                         {"relu_4": "device", "gemm_7": "edge", "relu_8": "edge",
                          "gemm_11": "cloud"}),
        "dag": make_plan(random_dag(40, width=16, seed=3), root / "dag",
                         {"relu_17": "device", "relu_26": "edge", "add_27": "edge",
                          "add_40": "cloud"}),
        "resnet_lossy": make_plan(resnet, root / "resnet_lossy", resnet_pins,
                                  codecs=["fp16+zstd", "int8"]),
    }


@pytest.fixture(scope="session")
def resnet_pipeline(plans):
    pipeline = Pipeline(plans["resnet"], metrics=True)
    yield pipeline
    pipeline.close()


def reference(plan_dir: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The whole model under one ONNX Runtime session."""
    import onnxruntime as ort

    session = ort.InferenceSession(load_plan(plan_dir).model.file,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def deploy_table(lines) -> dict[str, list[str]]:
    """The rows of `wpk-deploy --local`'s endpoint table as printed into a pipe (plain text:
    columns apart by two spaces or more), by tier: [tier, address, models, tensor link,
    metrics, pid, cpus, batch]."""
    import re

    rows = {}
    for line in lines:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 8 and cells[0] in ("device", "edge", "cloud"):
            rows[cells[0]] = cells
    return rows
