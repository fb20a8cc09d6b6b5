"""`wpk-probe HOST:PORT`: measure the link to a running tier server (RTT and bandwidth).

Works against any Open Inference Protocol (KServe v2 gRPC) server: a wpk tier (`wpk-serve`),
Triton, MLServer. What it sends, and why that measures the bytes that really cross the link:

- RTT: the median of `--rtt-samples` `ServerLive` calls (a few bytes each way).
- Bandwidth: `ModelInfer` requests carrying one raw UINT8 tensor of 16 KiB, 64 KiB, ... up to
  `--max-mb`, addressed to a model no server has (`__wpk_probe__`). gRPC hands a unary request
  to the server's handler only once the whole message has arrived, and the handler then
  answers NOT_FOUND with a few bytes: each call's time is one round trip plus the request's
  bytes crossing the link (client -> server, the direction tier data flows). A straight line
  through the median time per size (least squares on relative errors) gives the bandwidth
  (1/slope) and the fixed cost per call (intercept). Payloads are random bytes, so link
  compression cannot flatter the result.
- Bounded: at most `--max-requests` calls and about `--max-seconds` in all; a size is skipped
  when its predicted time would break the budget.

A wpk tier counts the probe's bytes in its `in` metric and the calls as NOT_FOUND.

Messages are the runtime's generated Open Inference Protocol classes (`wpk.runtime.protocol`)
on a plain synchronous channel with the runtime's channel options. Each size's request is
built and serialized once, before its calls: the timed call hands ready bytes to gRPC, so
protobuf serialization (tens of ms for 16 MiB) does not count as transfer time.
Needs grpcio (the `serve` extra); the profile tools do not.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from wpk import cli_args
from wpk.errors import WpkError, cli_entry
from wpk.runtime import protocol as pb

PROBE_MODEL = "__wpk_probe__"


def infer_request(model: str, payload: bytes) -> bytes:
    """A serialized ModelInferRequest with one raw UINT8 input tensor holding `payload`."""
    request = pb.ModelInferRequest(model_name=model, raw_input_contents=[payload])
    request.inputs.add(name="probe", datatype="UINT8", shape=[len(payload)])
    return request.SerializeToString()


# -- measurement -------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    address: str
    server: str | None
    rtt_ms: float                   # median ServerLive round trip
    rtt_p90_ms: float
    bandwidth_mbps: float           # client -> server, from the slope
    fixed_ms: float                 # intercept: per-call cost at zero bytes
    r2: float                       # fit quality (on relative errors) of time vs bytes
    requests: int
    seconds: float
    samples: list[dict[str, float]] = field(default_factory=list)  # {bytes, ms} per size
    capped_at_bytes: int | None = None  # server refused larger messages

    def link_entry(self, src: str, dst: str) -> str:
        return (f"  - {{from: {src}, to: {dst}, bandwidth: {_number(self.bandwidth_mbps)}mbit, "
                f"rtt: {_number(self.rtt_ms)}ms}}")


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024 or unit == "MiB":
            return f"{nbytes:.0f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.0f} GiB"


def _number(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


class _Probe:
    """One synchronous channel to the server; every call is timed and counted."""

    def __init__(self, address: str, max_seconds: float, max_requests: int):
        try:
            import grpc
        except ImportError:
            raise WpkError("wpk-probe needs grpcio: pip install 'wpk[serve]'") from None
        from wpk.runtime.client import channel_options

        self.grpc = grpc
        self.address = address
        self.deadline = time.perf_counter() + max_seconds
        self.max_requests = max_requests
        self.requests = 0
        self.channel = grpc.insecure_channel(address, options=channel_options())
        stub = pb.Stub(self.channel)
        # ModelInfer takes the request serialized beforehand (`infer_request`): no serializer,
        # so a timed call does not re-encode its payload.
        infer = self.channel.unary_unary(pb.method_path("ModelInfer"),
                                         response_deserializer=pb.ModelInferResponse.FromString)
        self.calls: dict[str, Callable[..., Any]] = {
            "ServerLive": stub.ServerLive, "ServerMetadata": stub.ServerMetadata,
            "ModelInfer": infer}

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def connect(self, timeout: float) -> None:
        try:
            self.grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except self.grpc.FutureTimeoutError:
            raise WpkError(f"{self.address}: no gRPC server answers "
                           f"(waited {timeout:g} s)") from None

    def server_name(self, timeout: float) -> str | None:
        """The name in ServerMetadata (a wpk tier: `wpk (<model>.<tier>)`), None if unknown."""
        self.requests += 1
        try:
            response = self.calls["ServerMetadata"](pb.ServerMetadataRequest(), timeout=timeout)
        except self.grpc.RpcError:
            return None
        return response.name or None

    def call(self, name: str, request: Any, timeout: float) -> tuple[float, Any]:
        """(seconds, status code) of one call; the status is OK or what the server answered."""
        grpc = self.grpc
        self.requests += 1
        start = time.perf_counter()
        try:
            self.calls[name](request, timeout=timeout)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
        elapsed = time.perf_counter() - start
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise WpkError(f"{self.address}: {name} failed ({code.name}) after "
                           f"{elapsed * 1000:.0f} ms")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise WpkError(f"{self.address}: the server does not implement {name}; "
                           "is it an Open Inference Protocol (KServe v2) server?")
        return elapsed, code

    def close(self) -> None:
        self.channel.close()


def _fit(sizes: list[int], seconds: list[float]) -> tuple[float, float, float]:
    """Least squares seconds = intercept + slope * bytes; returns (slope, intercept, r2).

    Residuals are relative (weights 1/y): sizes span three orders of magnitude, and plain
    least squares would let the largest transfer's noise decide the intercept.
    """
    x, y = np.asarray(sizes, float), np.asarray(seconds, float)
    slope, intercept = np.polyfit(x, y, 1, w=1.0 / y)
    relative = (y - (intercept + slope * x)) / y
    spread = (y - np.average(y, weights=1.0 / y ** 2)) / y
    total = float((spread ** 2).sum())
    r2 = 1.0 - float((relative ** 2).sum()) / total if total > 0 else 0.0
    return float(slope), float(intercept), r2


def probe(address: str, *, rtt_samples: int = 20, repeats: int = 5, min_kb: int = 16,
          max_mb: float = 16, max_seconds: float = 10.0, max_requests: int = 200,
          connect_timeout: float = 5.0) -> ProbeResult:
    """Measure the link to `address` (see the module docstring)."""
    max_bytes = _checked_max_bytes(address, rtt_samples, repeats, min_kb, max_mb, max_seconds,
                                   max_requests)
    client = _Probe(address, max_seconds, max_requests)
    started = time.perf_counter()
    try:
        client.connect(connect_timeout)
        live = pb.ServerLiveRequest()
        client.call("ServerLive", live, connect_timeout)  # warm the connection
        server = client.server_name(connect_timeout)
        rtts = _time_round_trips(client, live, rtt_samples, connect_timeout)
        sizes, medians, capped = _time_transfers(client, rtts, min_kb * 1024, max_bytes,
                                                 repeats, connect_timeout)
    finally:
        client.close()
    if len(sizes) < 2:
        why = f"the server refuses messages of {capped} bytes" if capped else \
            "the time budget ran out"
        raise WpkError(f"{address}: could not time two transfer sizes ({why}); "
                       "raise --max-seconds or lower --min-kb")
    slope, intercept, r2 = _fit(sizes, medians)
    if slope <= 0:
        raise WpkError(f"{address}: transfer time did not grow with size "
                       f"({len(sizes)} sizes); raise --max-mb")
    return ProbeResult(
        address=address, server=server, rtt_ms=statistics.median(rtts) * 1e3,
        rtt_p90_ms=float(np.percentile(rtts, 90)) * 1e3,
        bandwidth_mbps=8.0 / slope / 1e6, fixed_ms=max(intercept, 0.0) * 1e3, r2=r2,
        requests=client.requests, seconds=time.perf_counter() - started,
        samples=[{"bytes": s, "ms": round(m * 1e3, 4)} for s, m in zip(sizes, medians)],
        capped_at_bytes=capped)


def _checked_max_bytes(address: str, rtt_samples: int, repeats: int, min_kb: int,
                       max_mb: float, max_seconds: float, max_requests: int) -> int:
    """The largest payload in bytes, once the address and budgets make sense (else WpkError)."""
    if ":" not in address:
        raise WpkError(f"{address!r}: expected HOST:PORT")
    if repeats < 1 or rtt_samples < 1 or max_requests < 4 or max_seconds <= 0:
        raise WpkError("--repeats and --rtt-samples must be >= 1, --max-requests >= 4, "
                       "--max-seconds > 0")
    max_bytes = int(max_mb * 1024 * 1024)
    if max_bytes < 4 * min_kb * 1024:
        raise WpkError("--max-mb must allow at least two sizes (>= 4 x --min-kb)")
    return max_bytes


def _time_round_trips(client: _Probe, live: Any, rtt_samples: int,
                      timeout: float) -> list[float]:
    """Seconds of small ServerLive calls: at most a fifth of the time and a quarter of the
    requests."""
    rtts: list[float] = []
    rtt_budget = client.remaining() * 0.2
    rtt_start = time.perf_counter()
    while len(rtts) < rtt_samples and len(rtts) < client.max_requests // 4 and \
            (not rtts or time.perf_counter() - rtt_start < rtt_budget):
        rtts.append(client.call("ServerLive", live, timeout)[0])
    return rtts


def _time_transfers(client: _Probe, rtts: list[float], first_size: int, max_bytes: int,
                    repeats: int, connect_timeout: float
                    ) -> tuple[list[int], list[float], int | None]:
    """Growing payloads (x4) while the budget allows: (request bytes, median seconds) per
    size, and the request size the server refused as too large, if it did."""
    rng = np.random.default_rng()
    sizes: list[int] = []
    medians: list[float] = []
    size = first_size
    while size <= max_bytes:
        request_bytes = len(infer_request(PROBE_MODEL, b"")) + size + 4
        predicted = _predicted_seconds(sizes, medians, rtts, request_bytes)
        count = min(repeats, int(client.remaining() / max(predicted, 1e-6)) - 1,
                    client.max_requests - client.requests)
        if count < min(2, repeats):
            break
        request = infer_request(PROBE_MODEL, rng.bytes(size))
        times, capped = _time_one_size(client, request, count, repeats,
                                       max(10 * predicted, 2 * connect_timeout))
        if capped is not None:
            return sizes, medians, capped
        sizes.append(len(request))
        medians.append(statistics.median(times))
        size *= 4
    return sizes, medians, None


def _predicted_seconds(sizes: list[int], medians: list[float], rtts: list[float],
                       request_bytes: int) -> float:
    """How long one call of `request_bytes` may take, judged from the sizes timed so far."""
    if not sizes:
        return statistics.median(rtts)
    # Pessimistic: no fixed cost, and twice the measured rate, because large messages cost
    # more than linearly (page faults, copies), and building the request costs about one
    # transfer.
    predicted = 2 * medians[-1] * request_bytes / sizes[-1]
    if len(sizes) >= 2:
        slope, intercept, _ = _fit(sizes, medians)
        predicted = max(predicted, intercept + slope * request_bytes)
    return predicted


def _time_one_size(client: _Probe, request: bytes, count: int, repeats: int,
                   timeout: float) -> tuple[list[float], int | None]:
    """Seconds of up to `count` ModelInfer calls carrying `request`; stops early when the
    budget is spent (keeping at least two) or the server refuses the size (its bytes)."""
    times: list[float] = []
    for _ in range(count):
        if len(times) >= min(2, repeats) and client.remaining() <= 0:
            break  # the prediction was short: keep what fits, never overrun further
        elapsed, code = client.call("ModelInfer", request, timeout)
        if code == client.grpc.StatusCode.RESOURCE_EXHAUSTED:
            return times, len(request)
        times.append(elapsed)
    return times, None


def _tier_of(server: str | None) -> str | None:
    """'wpk (resnet_like.edge)' -> 'edge' (a wpk tier names itself in ServerMetadata)."""
    if server and server.startswith("wpk (") and server.endswith(")") and "." in server:
        return server[5:-1].rsplit(".", 1)[1]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wpk-probe", description=__doc__.splitlines()[0],
        epilog="example: wpk-probe 10.0.0.7:8001 --from device --to edge, then paste the "
               "printed entry under the tiers file's links: (appending a second links: key "
               "would replace the first)")
    parser.add_argument("address", metavar="HOST:PORT", type=cli_args.host_port,
                        help="a running tier server")
    parser.add_argument("--from", dest="src", default="device",
                        help="tier this machine is (default: device)")
    parser.add_argument("--to", dest="dst",
                        help="tier of the server (default: what a wpk tier reports, else edge)")
    parser.add_argument("--json", action="store_true", help="print the measurement as JSON")
    parser.add_argument("--rtt-samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="transfers per size")
    parser.add_argument("--min-kb", type=cli_args.positive_int, default=16,
                        help="smallest payload, KiB")
    parser.add_argument("--max-mb", type=float, default=16, help="largest payload, MiB")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="time budget")
    parser.add_argument("--max-requests", type=int, default=200, help="request budget")
    parser.add_argument("--connect-timeout", type=cli_args.positive_float, default=5.0,
                        help="seconds to wait for the server (default 5)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, name in (("--from", args.src), ("--to", args.dst)):
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            raise WpkError(f"{flag} {name!r}: a tier name is letters, digits, '_' and '.' "
                           f"(as in the tiers file)")
    if args.dst is not None and args.dst == args.src:
        raise WpkError(f"--from and --to are both {args.src!r}: a link joins two tiers")
    result = probe(args.address, rtt_samples=args.rtt_samples, repeats=args.repeats,
                   min_kb=args.min_kb, max_mb=args.max_mb, max_seconds=args.max_seconds,
                   max_requests=args.max_requests, connect_timeout=args.connect_timeout)
    dst = args.dst or _tier_of(result.server) or "edge"
    if args.json:
        data = asdict(result)
        data["link"] = {"from": args.src, "to": dst, "bandwidth_mbps": result.bandwidth_mbps,
                        "rtt_ms": result.rtt_ms}
        print(json.dumps(data, indent=1))
        return 0
    print(f"# wpk-probe {result.address}"
          f"{' (' + result.server + ')' if result.server else ''}: "
          f"rtt {_number(result.rtt_ms)} ms (median of ServerLive), "
          f"bandwidth {_number(result.bandwidth_mbps)} Mbit/s {args.src} -> {dst}, "
          f"fixed cost {_number(result.fixed_ms)} ms per call, r2 {result.r2:.3f}; "
          f"{result.requests} requests of up to {_size(result.samples[-1]['bytes'])}, "
          f"{result.seconds:.1f} s")
    if result.capped_at_bytes:
        print(f"# the server refused {result.capped_at_bytes} bytes: sizes stopped there")
    print("links:")
    print(result.link_entry(args.src, dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
