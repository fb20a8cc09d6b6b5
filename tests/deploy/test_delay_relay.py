"""The delay relay on loopback (no root needed): it adds the RTT it is asked for, not more."""
from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

MESSAGE = b"x" * 100


def _echo_server() -> tuple[socket.socket, int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed by the test
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1]


def _median_round_trip_ms(port: int, delay_ms: float, count: int = 30) -> float:
    relay = subprocess.Popen([sys.executable, "-m", "wpk.deploy.delay_relay", "--listen",
                              "127.0.0.1:0", "--to", f"127.0.0.1:{port}", "--delay-ms",
                              str(delay_ms)], stdout=subprocess.PIPE, text=True)
    try:
        line = relay.stdout.readline()
        assert line.startswith("ready"), line
        host, relay_port = line.split()[1].rsplit(":", 1)
        times = []
        with socket.create_connection((host, int(relay_port)), timeout=5) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(count):
                start = time.perf_counter()
                conn.sendall(MESSAGE)
                received = 0
                while received < len(MESSAGE):
                    received += len(conn.recv(len(MESSAGE)))
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    finally:
        relay.terminate()
        relay.wait(timeout=10)


def test_relay_adds_the_rtt_within_a_fraction_of_a_millisecond():
    """RTT 5 ms: the relay's own lateness stays well under a millisecond per round trip. With
    asyncio's default epoll loop, which rounds waits up to whole milliseconds, it added 1.6 ms
    (a 5 ms link read 6.6 ms); with the select() loop it adds ~0.2 ms."""
    listener, port = _echo_server()
    try:
        base = _median_round_trip_ms(port, 0)
        delayed = _median_round_trip_ms(port, 2.5)
    finally:
        listener.close()
    assert delayed - base == pytest.approx(5.0, abs=0.8), (base, delayed)
