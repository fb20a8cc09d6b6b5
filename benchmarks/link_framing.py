"""The tensor link's framing vs pyzmq zero-copy multipart, between two processes on 127.0.0.1.

    python benchmarks/link_framing.py [--rounds 5] [--seconds 0.3] [--window 8]

Why: the tensor link (wpk/runtime/link_frames.py) is wpk's own framing over a plain TCP
socket; ZeroMQ is the usual library for this. This measures whether pyzmq would move the
same tensors faster, to decide whether to keep the simpler one (ours: no dependency).

Both sides move the same float32 tensors (8 KB, 600 KB, 4 MB) to an echo server in another
process, which answers with the tensors it received, decoded to numpy views first:
- wpk: `link_frames.encode` + `send_parts` (one sendmsg, no joining copy) out, `FrameReader`
  in, `Frame.arrays` to decode; the server the same. One TCP connection, TCP_NODELAY.
- zmq: DEALER -> ROUTER, `send_multipart([meta, tensor], copy=False)` out,
  `recv_multipart(copy=False)` in, `np.frombuffer` on the frame's buffer; the same small
  JSON metadata per message as wpk's (name, datatype, shape).
Latency: one request at a time, round trip p50 / p99. Throughput: `--window` requests in
flight (wpk: a sender thread and a reader, as a raw socket needs; zmq: one thread, its I/O
thread queues), tensor MB/s each way. Transports alternate within every round (order
reversed each round) so that load from elsewhere hits both alike.

pyzmq is not a dependency of wpk: install it into an environment of your own. Without it,
this script says so in one line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from wpk.runtime.link_frames import ANSWER, REQUEST, FrameReader, encode, send_parts

SIZES = {"8 KB": 2 * 1024, "600 KB": 150 * 1024, "4 MB": 1024 * 1024}   # float32 elements
TRANSPORTS = ("wpk", "zmq")


# -- servers (each in a process of its own) -------------------------------------------------
def serve_wpk() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"ready {listener.getsockname()[1]}", flush=True)
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = FrameReader(sock)
        try:
            while True:
                frame = reader.read()
                send_parts(sock, encode(ANSWER, frame.request_id, frame.arrays("echo")))
        except (EOFError, OSError):
            sock.close()


def serve_zmq() -> None:
    import zmq

    router = zmq.Context.instance().socket(zmq.ROUTER)
    print(f"ready {router.bind_to_random_port('tcp://127.0.0.1')}", flush=True)
    while True:
        identity, meta, data = router.recv_multipart(copy=False)
        name, dtype, shape = json.loads(meta.bytes)
        array = np.frombuffer(data.buffer, dtype=dtype).reshape(shape)   # decoded, as wpk's
        router.send_multipart([identity, meta, memoryview(array).cast("B")], copy=False)


# -- clients ---------------------------------------------------------------------------------
class WpkClient:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader(self.sock)

    def round_trip(self, array: np.ndarray) -> None:
        send_parts(self.sock, encode(REQUEST, 1, {"x": array}, model="echo"))
        self.reader.read().arrays("echo")

    def pipelined(self, array: np.ndarray, count: int, window: int) -> None:
        room = threading.Semaphore(window)

        def send() -> None:
            for i in range(count):
                room.acquire()
                send_parts(self.sock, encode(REQUEST, i + 1, {"x": array}, model="echo"))

        sender = threading.Thread(target=send)
        sender.start()
        for _ in range(count):
            self.reader.read().arrays("echo")
            room.release()
        sender.join()

    def close(self) -> None:
        self.sock.close()


class ZmqClient:
    def __init__(self, port: int):
        import zmq

        self.dealer = zmq.Context.instance().socket(zmq.DEALER)
        self.dealer.connect(f"tcp://127.0.0.1:{port}")

    def _send(self, array: np.ndarray) -> None:
        meta = json.dumps(["x", array.dtype.str, list(array.shape)]).encode()
        self.dealer.send_multipart([meta, memoryview(array).cast("B")], copy=False)

    def _receive(self) -> np.ndarray:
        meta, data = self.dealer.recv_multipart(copy=False)
        name, dtype, shape = json.loads(meta.bytes)
        return np.frombuffer(data.buffer, dtype=dtype).reshape(shape)

    def round_trip(self, array: np.ndarray) -> None:
        self._send(array)
        self._receive()

    def pipelined(self, array: np.ndarray, count: int, window: int) -> None:
        for _ in range(min(window, count)):
            self._send(array)
        for sent in range(min(window, count), count + min(window, count)):
            self._receive()
            if sent < count:
                self._send(array)

    def close(self) -> None:
        self.dealer.close(linger=0)


# -- measuring -------------------------------------------------------------------------------
def start_server(kind: str) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, __file__, "--serve", kind],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().split()
    if not line or line[0] != "ready":
        process.kill()
        raise SystemExit(f"link_framing.py: the {kind} echo server did not start")
    return process, int(line[1])


def latencies(client, array: np.ndarray, seconds: float) -> list[float]:
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 20:
        start = time.perf_counter()
        client.round_trip(array)
        times.append(time.perf_counter() - start)
    return times


def throughput(client, array: np.ndarray, seconds: float, window: int) -> float:
    """Tensor MB/s each way with `window` requests in flight (count sized to ~`seconds`)."""
    start = time.perf_counter()
    client.pipelined(array, window, window)      # a first probe sizes the real run
    per = (time.perf_counter() - start) / window
    count = max(window * 2, int(seconds / max(per, 1e-6)))
    start = time.perf_counter()
    client.pipelined(array, count, window)
    return count * array.nbytes / (time.perf_counter() - start) / 1e6


def measure(rounds: int, seconds: float, window: int) -> dict:
    servers = {kind: start_server(kind) for kind in TRANSPORTS}
    clients = {"wpk": WpkClient(servers["wpk"][1]), "zmq": ZmqClient(servers["zmq"][1])}
    arrays = {label: np.random.default_rng(0).standard_normal(n).astype(np.float32)
              for label, n in SIZES.items()}
    lat = {(k, s): [] for k in TRANSPORTS for s in SIZES}
    lat_rounds = {(k, s): [] for k in TRANSPORTS for s in SIZES}
    rate = {(k, s): [] for k in TRANSPORTS for s in SIZES}
    try:
        for kind in TRANSPORTS:   # warm up: connections, page faults, allocators
            for array in arrays.values():
                latencies(clients[kind], array, 0.05)
        for r in range(rounds):
            order = TRANSPORTS if r % 2 == 0 else TRANSPORTS[::-1]
            for size, array in arrays.items():
                for kind in order:
                    times = latencies(clients[kind], array, seconds)
                    lat[(kind, size)] += times
                    lat_rounds[(kind, size)].append(statistics.median(times))
                    rate[(kind, size)].append(throughput(clients[kind], array, seconds, window))
    finally:
        for client in clients.values():
            client.close()
        for process, _ in servers.values():
            process.kill()
            process.wait()
    return {"latency": lat, "latency_rounds": lat_rounds, "rate": rate}


def report(results: dict, rounds: int, window: int) -> None:
    print(f"round trip on 127.0.0.1 (echo, float32 tensor each way), {rounds} rounds; "
          f"p50 / p99 over every round trip, [range of the rounds' medians]; throughput at "
          f"{window} in flight, median [min-max] of the rounds")
    print(f"{'size':>7} {'transport':>9} {'p50 us':>8} {'p99 us':>8} {'round p50s us':>17} "
          f"{'MB/s each way':>14} {'[min-max]':>15}")
    for size in SIZES:
        for kind in TRANSPORTS:
            times = np.array(results["latency"][(kind, size)]) * 1e6
            medians = np.array(results["latency_rounds"][(kind, size)]) * 1e6
            rates = results["rate"][(kind, size)]
            print(f"{size:>7} {kind:>9} {np.percentile(times, 50):8.0f} "
                  f"{np.percentile(times, 99):8.0f} "
                  f"{f'[{medians.min():.0f}-{medians.max():.0f}]':>17} "
                  f"{statistics.median(rates):14.0f} "
                  f"{f'[{min(rates):.0f}-{max(rates):.0f}]':>15}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=0.3,
                        help="per measurement, per size and transport (default 0.3)")
    parser.add_argument("--window", type=int, default=8,
                        help="requests in flight for the throughput (default 8)")
    parser.add_argument("--serve", choices=TRANSPORTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        import zmq  # noqa: F401
    except ImportError:
        print("link_framing.py: pyzmq is not installed here (not a wpk dependency); "
              "nothing measured")
        return 0
    if args.serve:
        (serve_wpk if args.serve == "wpk" else serve_zmq)()
        return 0
    if args.rounds < 1 or args.seconds <= 0 or args.window < 1:
        parser.error("--rounds and --window must be >= 1, --seconds > 0")
    report(measure(args.rounds, args.seconds, args.window), args.rounds, args.window)
    return 0


if __name__ == "__main__":
    sys.exit(main())
