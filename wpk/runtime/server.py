"""Run one tier: `wpk-serve PLAN_DIR --tier NAME --port N [--next HOST:PORT]`.

Prints one line when ready, which `wpk-deploy` reads to learn the port:
    wpk-serve: tier edge of resnet_like ready on 127.0.0.1:40123 (models: ...) metrics http://127.0.0.1:40124/metrics
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import dataclass
from typing import Any

from wpk import cli_args
from wpk.errors import WpkError, cli_entry, one_line_warnings
from wpk.plan import load_plan
from wpk.runtime.batching import BatchPolicy, add_batching_arguments, batch_policy_from_args
from wpk.runtime.client import DEFAULT_MAX_MESSAGE_BYTES
from wpk.runtime.cpu_latency import cpu_latency_limit
from wpk.runtime.cpus import cpu_list, physical_cores, pin_process
from wpk.runtime.metrics import serve_metrics
from wpk.runtime.kserve_servicer import KServeServicer
from wpk.runtime.link_handler import LinkHandler
from wpk.runtime.link_server import LinkServer
from wpk.runtime.shared_memory import SharedMemoryRegistry
from wpk.runtime.tier_core import DEFAULT_HOP_TIMEOUT_S, DEFAULT_MAX_IN_FLIGHT, TierCore
from wpk.runtime import protocol, tls
from wpk.runtime.health import health_handler

READY_MARK = "ready on"


def server_options(max_message_bytes: int) -> list[tuple]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            # gRPC's core cancels calls beyond ~1000 not yet handed to the server (a bare
            # CANCELLED): let them all reach the tier core, which answers the ones beyond
            # --max-in-flight with RESOURCE_EXHAUSTED in words
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 100_000)]


@dataclass(frozen=True)
class ServeConfig:
    """Everything one tier's server is started with: wpk-serve's flags, read once
    (`from_args`) and handed down, instead of a score of parameters on every function."""

    plan_dir: str
    tier: str
    host: str = "127.0.0.1"
    port: int = 8001
    next_address: str | None = None
    name: str | None = None
    threads: int = 0
    workers: int = 1
    metrics_port: int | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    hop_timeout: float = DEFAULT_HOP_TIMEOUT_S
    run: str = "auto"
    tls_dir: str | None = None
    spin: bool = False
    link: str = "tcp"
    link_port: int = 0
    shared_memory: bool = True
    restarts: int = 0
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    batching: BatchPolicy | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServeConfig":
        """wpk-serve's parsed flags, checked together (WpkError naming the flags)."""
        if args.threads < 0 or args.workers < 1:
            raise WpkError("--threads must be >= 0, --workers >= 1")
        if args.tls_dir and args.link == "tcp":
            raise WpkError("--link tcp with --tls-dir: the tensor link is plain TCP; TLS tiers "
                           "talk over gRPC (leave --link out)")
        # on --cpus, ONNX Runtime's default is one thread per physical core among them
        threads = args.threads or (len(physical_cores(args.cpus)) if args.cpus is not None
                                   else 0)
        return cls(args.plan_dir, args.tier, host=args.host, port=args.port,
                   next_address=args.next_address, name=args.name, threads=threads,
                   workers=args.workers, metrics_port=args.metrics_port,
                   max_message_bytes=args.max_message_mb * 1024 * 1024,
                   hop_timeout=args.hop_timeout, run=args.run, tls_dir=args.tls_dir,
                   spin=args.spin, link=args.link or "tcp", link_port=args.link_port,
                   shared_memory=args.shared_memory, restarts=args.restart_count,
                   max_in_flight=args.max_in_flight,
                   batching=batch_policy_from_args(args))


async def serve(plan_dir: str, tier: str, *, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None, announce=print, **options: Any) -> None:
    """Serve one tier until `stop` is set (or SIGINT/SIGTERM when `stop` is None); `options`
    are `ServeConfig`'s fields (host, port, next_address, threads, ...)."""
    await serve_tier(ServeConfig(plan_dir, tier, **options), ready=ready, stop=stop,
                     announce=announce)


async def serve_tier(config: ServeConfig, *, ready: asyncio.Event | None = None,
                     stop: asyncio.Event | None = None, announce=print) -> None:
    """Serve the tier `config` describes until `stop` is set (or SIGINT/SIGTERM when `stop`
    is None); `ready` is set once it listens, with what tests look inside hung on it."""
    import grpc

    plan = load_plan(config.plan_dir)
    creds = tls.load(config.tls_dir, config.tier) if config.tls_dir else None
    core = TierCore(plan, config.plan_dir, config.tier, config.next_address, name=config.name,
                    threads=config.threads, workers=config.workers,
                    hop_timeout=config.hop_timeout, run=config.run, spin=config.spin,
                    link=config.link, max_in_flight=config.max_in_flight,
                    batching=config.batching,
                    channel_credentials=tls.channel_credentials(creds) if creds else None)
    core.metrics.restarts = config.restarts
    registry = SharedMemoryRegistry(core.where) if config.shared_memory else None
    server = grpc.aio.server(options=server_options(config.max_message_bytes))
    bound = _listen(server, config, creds)
    await core.start()
    link_server = await _start_link_server(core, config)
    servicer = KServeServicer(core, registry, link_server)
    server.add_generic_rpc_handlers((protocol.generic_handler(servicer),
                                     health_handler(lambda: core.serving)))
    metrics_server = None
    try:
        metrics_text = ""
        if config.metrics_port is not None:
            metrics_server, metrics_text = await _start_metrics(core, config)
        await server.start()
        if link_server is not None:
            metrics_text += f" tensor-link {config.host}:{link_server.port}"
        stop = stop if stop is not None else _stop_on_signals()
        announce(f"wpk-serve: tier {config.tier} of {core.name} {READY_MARK} "
                 f"{config.host}:{bound} (models: {', '.join(core.models)}){metrics_text}")
        if ready is not None:
            _show_tests(ready, bound, core, link_server)
        await stop.wait()
    finally:
        core.serving = False   # health checks say NOT_SERVING while calls drain
        await server.stop(grace=1.0)
        if metrics_server is not None:
            metrics_server.close()
        if link_server is not None:
            link_server.close()
        await core.stop()
        if registry is not None:
            registry.close()


def _listen(server, config: ServeConfig, creds) -> int:
    """Add the gRPC port (TLS with `creds`) to `server`; the port bound, or WpkError."""
    address = f"{config.host}:{config.port}"
    try:
        if creds is not None:
            bound = server.add_secure_port(address, tls.server_credentials(creds))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio >= 1.5x raises instead of returning 0
        bound = 0
    if bound == 0:
        raise WpkError(f"tier {config.tier!r}: cannot listen on {address} (the port in use, or "
                       f"an address this machine does not have?)")
    return bound


async def _start_link_server(core: TierCore, config: ServeConfig) -> LinkServer | None:
    """The tensor link's listener when the tier speaks it (the entry tier too: clients on its
    host use it, see link_client); on a port it cannot have, the core stops and WpkError.
    Shared-memory lanes go with `config.shared_memory`."""
    if core.link_kind != "tcp":
        return None
    try:
        return LinkServer(config.host, config.link_port, LinkHandler(core),
                          max_payload=config.max_message_bytes, where=core.where,
                          lanes=config.shared_memory)
    except OSError as error:
        await core.stop()
        raise WpkError(f"tier {config.tier!r}: cannot listen for the tensor link on "
                       f"{config.host}:{config.link_port} ({error.strerror})") from None


async def _start_metrics(core: TierCore, config: ServeConfig
                         ) -> tuple[asyncio.AbstractServer, str]:
    """The Prometheus endpoint, and the words the ready line says about it."""
    host, metrics_port = config.host, config.metrics_port
    try:
        metrics_server = await serve_metrics(core.metrics, host, metrics_port)
    except OSError as error:
        raise WpkError(f"tier {config.tier!r}: cannot serve metrics on {host}:{metrics_port} "
                       f"({error.strerror or error})") from None
    metrics_bound = metrics_server.sockets[0].getsockname()[1]
    return metrics_server, f" metrics http://{host}:{metrics_bound}/metrics"


def _stop_on_signals() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _show_tests(ready: asyncio.Event, bound: int, core: TierCore,
                link_server: LinkServer | None) -> None:
    """Hang what tests look inside on `ready`, then set it."""
    ready.port = bound  # type: ignore[attr-defined]
    ready.service = core  # type: ignore[attr-defined]
    ready.link_server = link_server  # type: ignore[attr-defined]
    ready.set()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wpk-serve", description="Serve one tier of a plan over the Open Inference "
        "Protocol (KServe v2 gRPC), forwarding cut tensors to the next tier.")
    parser.add_argument("plan_dir", metavar="PLAN_DIR", help="directory written by wpk-partition")
    parser.add_argument("--tier", required=True, help="which tier of the plan to serve")
    parser.add_argument("--port", type=cli_args.port, default=8001,
                        help="gRPC port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (0.0.0.0 for every interface)")
    parser.add_argument("--next", dest="next_address", metavar="HOST:PORT",
                        type=cli_args.host_port,
                        help="the next tier's server (required unless this tier is the last)")
    parser.add_argument("--name", help="model name to serve (default: the plan's)")
    parser.add_argument("--threads", type=cli_args.threads, default=0,
                        help="ONNX Runtime intra-op threads (0: ORT's default)")
    parser.add_argument("--spin", action="store_true",
                        help="let ONNX Runtime's threads spin-wait between runs (ORT's own "
                        "default; off here: spinning threads take the cores gRPC needs)")
    parser.add_argument("--workers", type=int, default=1,
                        help="slice runs at once on this tier (default 1)")
    parser.add_argument("--run", choices=("auto", "inline", "thread", "alone"), default="auto",
                        help="where the slice runs: on the event loop (inline), in a worker "
                        "thread, on the loop only while no other request is in flight (alone), "
                        "or auto (default): a slice under 5 ms inline on fewer than 4 cores, "
                        "alone on 4 or more; slower slices in a thread")
    parser.add_argument("--link", choices=("tcp", "grpc"), default=None,
                        help="how tiers pass tensors: tcp, the tensor link (binary frames on "
                        "a second port, found through ServerMetadata; the default and the "
                        "only choice: grpc, gRPC streams, was removed and means tcp, with a "
                        "warning). With --tls-dir, tiers talk gRPC (ModelInfer calls)")
    parser.add_argument("--max-in-flight", type=cli_args.positive_int,
                        default=DEFAULT_MAX_IN_FLIGHT, metavar="N",
                        help="gRPC requests this tier holds at once; more are answered "
                        f"RESOURCE_EXHAUSTED so that clients back off (default "
                        f"{DEFAULT_MAX_IN_FLIGHT})")
    add_batching_arguments(parser)
    parser.add_argument("--restart-count", type=cli_args.non_negative_int, default=0,
                        metavar="N", help="how many times a supervisor has restarted this tier "
                        "(reported as wpk_tier_restarts; wpk-deploy --local sets it)")
    parser.add_argument("--link-port", type=cli_args.port, default=0,
                        help="port of this tier's tensor link (default 0: any free port)")
    parser.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                        help="do not serve Triton's system shared-memory extension, nor map "
                        "the shared-memory lanes of the previous tier or of clients on the "
                        "tensor link (both by default: clients and tiers on this host pass "
                        "tensors through /dev/shm)")
    parser.add_argument("--tls-dir", metavar="DIR",
                        help="mutual TLS: ca.pem, TIER.pem and TIER.key in DIR (wpk-deploy "
                        "--tls writes them); peers without a certificate from that CA are "
                        "refused")
    parser.add_argument("--metrics-port", type=cli_args.port, default=None,
                        help="serve Prometheus /metrics on this port (0: any free port)")
    parser.add_argument("--max-message-mb", type=MESSAGE_MB,
                        default=DEFAULT_MAX_MESSAGE_BYTES // (1024 * 1024),
                        help="largest gRPC message sent or received, MiB (default 256)")
    parser.add_argument("--cpus", type=cpu_list, metavar="LIST",
                        help="run this tier on these CPUs only, e.g. 2-3 or 0,4 (taskset's "
                        "syntax); with --threads 0, ONNX Runtime then uses one thread per "
                        "physical core among them")
    parser.add_argument("--cpu-latency-us", type=cli_args.non_negative_int, metavar="US",
                        help="while serving, keep this machine's idle CPUs able to wake within "
                        "US microseconds (Linux PM QoS, /dev/cpu_dma_latency; needs root): each "
                        "hop wakes a sleeping tier, and a deep idle state makes that slow. 0 is "
                        "quickest and costs the most power")
    parser.add_argument("--hop-timeout", type=cli_args.positive_float,
                        default=DEFAULT_HOP_TIMEOUT_S,
                        help="seconds to wait for the next tier when the caller set no "
                        "deadline (default 60)")
    return parser


# gRPC counts a message's bytes in a signed 32-bit integer
MESSAGE_MB = cli_args.int_between(1, (2**31 - 1) // 2**20, "gRPC's limit is 2 GiB")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = ServeConfig.from_args(args)
    if args.cpus is not None:   # before ONNX Runtime and gRPC start their threads
        pin_process(args.cpus)
    announce = lambda line: print(line, flush=True)  # noqa: E731
    with one_line_warnings(), cpu_latency_limit(args.cpu_latency_us):
        # (one_line_warnings: e.g. an OpenVINO slice served by ONNX Runtime: one line)
        asyncio.run(serve_tier(config, announce=announce))
    return 0


if __name__ == "__main__":
    sys.exit(main())
