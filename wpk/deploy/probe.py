"""A plain-socket request/response probe: what a link costs without any inference on it.

The server reads a 16-byte header (bytes up, bytes down), the `up` bytes, then answers with
`down` bytes. The client times each exchange on one persistent connection, so a run of
`(up, down)` requests measures a link's serialization time in both directions plus its RTT:
the network part of a pipeline stage, measured the same way gRPC sees it.

    python -m wpk.deploy.probe serve --listen 0.0.0.0:9200
    python -m wpk.deploy.probe send --to 10.77.0.2:9300 --up 600000 --down 4000 --repeat 5

`send` prints one JSON object: {"ms": [...], "median_ms": ...}.
"""
from __future__ import annotations

import argparse
import json
import socket
import socketserver
import statistics
import struct
import sys
import time

from wpk.deploy.delay_relay import parse_hostport
from wpk.errors import WpkError, cli_entry

_HEADER = struct.Struct("!QQ")
_BLOCK = b"\0" * (1 << 20)


def _recv_exact(sock: socket.socket, n: int) -> None:
    view = bytearray(min(n, 1 << 20))
    while n > 0:
        got = sock.recv_into(view, min(n, len(view)))
        if got == 0:
            raise ConnectionError("peer closed")
        n -= got


def _send_zeros(sock: socket.socket, n: int) -> None:
    while n > 0:
        chunk = _BLOCK[:min(n, len(_BLOCK))]
        sock.sendall(chunk)
        n -= len(chunk)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        header = bytearray(_HEADER.size)
        while True:
            try:
                view, need = memoryview(header), _HEADER.size
                while need:
                    got = sock.recv_into(view[_HEADER.size - need:], need)
                    if got == 0:
                        return
                    need -= got
                up, down = _HEADER.unpack(header)
                _recv_exact(sock, up)
                _send_zeros(sock, max(down, 1))
            except (ConnectionError, OSError):
                return


class ProbeServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: tuple[str, int]):
        super().__init__(listen, _Handler)


def exchange_times(target: tuple[str, int], up: int, down: int, repeat: int = 3,
                   warmup: int = 1) -> list[float]:
    """Milliseconds per (send `up` bytes, receive `down` bytes) on one connection."""
    down = max(down, 1)
    with socket.create_connection(target, timeout=120) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for i in range(warmup + repeat):
            start = time.perf_counter()
            sock.sendall(_HEADER.pack(up, down))
            _send_zeros(sock, up)
            _recv_exact(sock, down)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
        return times


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wpk.deploy.probe",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--listen", required=True)
    send = sub.add_parser("send")
    send.add_argument("--to", required=True)
    send.add_argument("--up", type=int, required=True)
    send.add_argument("--down", type=int, default=1)
    send.add_argument("--repeat", type=int, default=3)
    send.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "serve":
        server = ProbeServer(parse_hostport(args.listen, "--listen"))
        host, port = server.server_address[:2]
        print(f"ready {host}:{port}", flush=True)
        server.serve_forever()
        return 0
    try:
        times = exchange_times(parse_hostport(args.to, "--to"), args.up, args.down,
                               args.repeat, args.warmup)
    except OSError as error:
        raise WpkError(f"probe to {args.to}: {error}") from None
    print(json.dumps({"ms": times, "median_ms": statistics.median(times)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
