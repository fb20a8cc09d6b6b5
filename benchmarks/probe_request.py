"""What serializing the ModelInfer request inside the timed call would cost wpk-probe.

wpk-probe builds and serializes each size's request once (`infer_request`) and times calls
that hand those bytes to gRPC. The alternative, passing the message through the stub's
serializer, re-encodes the payload inside every timed call. Side by side on 127.0.0.1
(a server answering NOT_FOUND, as any server does to the probe): median call time per size
and the bandwidth each would report for that size alone.

    python benchmarks/probe_request.py
"""
from __future__ import annotations

import statistics
import time
from concurrent import futures

import grpc
import numpy as np

from wpk.runtime import protocol as pb
from wpk.runtime.client import channel_options
from wpk.runtime.probe import PROBE_MODEL, infer_request

SIZES_MIB = [1, 4, 16]
CALLS = 9


def _not_found(request: bytes, context) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no model")


def _median_ms(call, request) -> float:
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        try:
            call(request, timeout=30)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=channel_options())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(pb.SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(_not_found)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
    prebuilt = channel.unary_unary(pb.method_path("ModelInfer"))  # bytes in, as the probe
    per_call = pb.Stub(channel).ModelInfer                         # message in, serialized per call
    rng = np.random.default_rng(0)
    print(f"{'size':>7} {'prebuilt ms':>12} {'per-call ms':>12} {'ratio':>6} "
          f"{'Mbit/s prebuilt':>16} {'per-call':>9}")
    try:
        for mib in SIZES_MIB:
            data = infer_request(PROBE_MODEL, rng.bytes(mib << 20))
            message = pb.ModelInferRequest.FromString(data)
            _median_ms(prebuilt, data)  # warm up
            ours, theirs = _median_ms(prebuilt, data), _median_ms(per_call, message)
            print(f"{mib:>4} MiB {ours:>12.2f} {theirs:>12.2f} {theirs / ours:>6.2f} "
                  f"{len(data) * 8 / ours / 1e3:>16.0f} {len(data) * 8 / theirs / 1e3:>9.0f}")
    finally:
        channel.close()
        server.stop(grace=None)


if __name__ == "__main__":
    main()
