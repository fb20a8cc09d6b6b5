"""Where a single tier's latency over ONNX Runtime alone goes: gRPC Python itself, or wpk.

Three things measured with one minimal client (a grpc unary stub sending a prebuilt KServe v2
ModelInferRequest, one request at a time), in interleaved rounds:

- ORT alone: the model's session run in this process (1 intra-op thread);
- bare gRPC: a grpc.aio server (in its own process) that answers every ModelInfer with a
  canned response of the model's output size and does nothing else: the floor any Python
  gRPC server pays on this machine;
- wpk-serve: the model as a one-tier plan, `wpk-serve --threads 1`.

It prints each one's p50 (median over rounds) and the split of wpk-serve - ORT alone (the
tier's overhead): the bare round trip (gRPC's share), the slice's own run inside the server
beyond ORT alone here (its mean from the tier's `wpk_slice_seconds` metric), and the rest:
wpk's own work per request.

    python benchmarks/grpc_floor.py [--model mlp] [--rounds 7] [--seconds 1]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wpk.bridge.broker import free_port  # noqa: E402
from wpk.examples import EXAMPLES  # noqa: E402
from wpk.runtime import protocol as pb  # noqa: E402

SERVICE, METHOD = "inference.GRPCInferenceService", "ModelInfer"


def request_for(model: str, feeds: dict[str, np.ndarray]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, array in feeds.items():
        request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    return request


def canned_response(model: str, outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model)
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    return response


def serve_bare(port: int, response_file: Path) -> None:
    """The bare server: every ModelInfer gets the canned response (no parsing, no work)."""
    response = pb.ModelInferResponse.FromString(response_file.read_bytes())

    async def answer(request, context):
        return response

    async def main() -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelInferResponse.SerializeToString)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {METHOD: handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()
    asyncio.run(main())


def stub(port: int):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=60)
    return channel.unary_unary(f"/{SERVICE}/{METHOD}",
                               request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)


def p50_us(call, seconds: float) -> float:
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def slice_seconds(port: int) -> tuple[float, float]:
    """(sum, count) of the tier's wpk_slice_seconds histogram."""
    from urllib.request import urlopen

    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("wpk_slice_seconds_sum", "wpk_slice_seconds_count")):
            values[line.split("{")[0].split(" ")[0]] = float(line.rsplit(" ", 1)[1])
    return values["wpk_slice_seconds_sum"], values["wpk_slice_seconds_count"]


def start(command: list[str], ready: str) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT)
    for line in process.stdout:
        if ready in line:
            return process
    raise SystemExit(f"{command[2]} did not start: {process.wait()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=sorted(EXAMPLES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--serve-bare", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(int(args.serve_bare[0]), Path(args.serve_bare[1]))
        return 0
    from wpk.partitioner.api import partition

    work = Path(tempfile.mkdtemp(prefix="wpk-grpc-floor-"))
    model_path = work / f"{args.model}.onnx"
    onnx.save(EXAMPLES[args.model](), str(model_path))
    plan = partition(model_path, tiers=["device"], out_dir=work / "plan",
                     use_calibration=False).plan
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.default_rng(0).random(i.shape).astype(np.float32)
             for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, feeds)))
    canned = work / "response.pb"
    canned.write_bytes(canned_response(plan.name, outputs).SerializeToString())
    bare_port, wpk_port, metrics_port = free_port(), free_port(), free_port()
    bare = start([sys.executable, __file__, "--serve-bare", str(bare_port), str(canned)],
                 "ready")
    tier = start([sys.executable, "-m", "wpk.runtime.server", str(work / "plan"), "--tier",
                  "device", "--port", str(wpk_port), "--threads", "1", "--metrics-port",
                  str(metrics_port)], "ready on")
    try:
        request = request_for(plan.name, feeds)
        bare_call, wpk_call = stub(bare_port), stub(wpk_port)
        contenders = {"ORT alone (in-process)": lambda: session.run(names, feeds),
                      "bare gRPC (canned answer)": lambda: bare_call(request),
                      "wpk-serve": lambda: wpk_call(request)}
        for call in contenders.values():   # warm up
            p50_us(call, 0.3)
        rounds: dict[str, list[float]] = {label: [] for label in contenders}
        slice_before = slice_seconds(metrics_port)
        for index in range(args.rounds):
            order = list(contenders)[index % 3:] + list(contenders)[:index % 3]
            for label in order:
                rounds[label].append(p50_us(contenders[label], args.seconds))
        slice_after = slice_seconds(metrics_port)
    finally:
        for process in (bare, tier):
            process.terminate()
            process.wait(10)
    median = {label: statistics.median(values) for label, values in rounds.items()}
    print(f"{args.model}: p50 per request, median of {args.rounds} rounds [min, max] (us)")
    for label, values in rounds.items():
        print(f"  {label:28s} {median[label]:9.0f} [{min(values):.0f}, {max(values):.0f}]")
    alone = median["ORT alone (in-process)"]
    overhead = median["wpk-serve"] - alone
    floor = median["bare gRPC (canned answer)"]
    in_server = (slice_after[0] - slice_before[0]) / max(slice_after[1] - slice_before[1], 1) \
        * 1e6
    print(f"  the slice inside wpk-serve (mean, wpk_slice_seconds) {in_server:9.0f}")
    print(f"wpk-serve over ORT alone: {overhead:.0f} us = bare gRPC round trip {floor:.0f} us "
          f"+ the slice slower in the server by {in_server - alone:.0f} us + wpk's own work "
          f"{overhead - floor - (in_server - alone):.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
