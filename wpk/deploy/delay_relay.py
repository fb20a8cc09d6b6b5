"""A TCP relay that adds a fixed one-way delay in each direction: netem's delay, in user space.

This kernel has `tbf`/`htb` but no `netem`, so links get their bandwidth from `tc` and their
round-trip time from this relay: every chunk read from one side is written to the other side
`delay_ms` later (RTT/2 per direction). Reading never waits for the delay, so throughput and
pipelining are preserved: a stream at the shaped rate leaves the relay at the same rate, shifted
by the delay, exactly like bytes in flight on a long wire. Connections are relayed concurrently.

The event loop waits with select(), not epoll: epoll rounds every wait up to a whole
millisecond, which released each chunk 0.7 ms late on average (1 ms at worst), so a 40 ms RTT
read 41.5 ms and a 5 ms one ~6.5 ms. select() waits in microseconds (~0.2 ms late here); its
limit of 1024 file descriptors is far above the few connections a relay carries.

    python -m wpk.deploy.delay_relay --listen 10.77.0.2:9100 --to 127.0.0.1:9001 --delay-ms 2.5

prints `ready HOST:PORT` on stdout once it accepts connections. `--listen`/`--to` pairs may be
repeated: one process (one event loop) then relays several ports of the same tier with the
same delay, e.g. its gRPC port and its tensor-link port (`ready HOST:PORT HOST:PORT`).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import selectors
import socket
import sys
import time

from wpk.errors import WpkError, cli_entry

CHUNK = 256 * 1024
MAX_BUFFERED = 64 * 1024 * 1024  # per direction: far above any bandwidth-delay product we use


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay_s: float) -> None:
    """Copy reader -> writer, each chunk released `delay_s` after it arrived."""
    if delay_s <= 0:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        finally:
            _half_close(writer)
        return
    pending: collections.deque[tuple[float, bytes]] = collections.deque()
    buffered = 0
    arrived = asyncio.Event()
    room = asyncio.Event()
    room.set()
    eof = False

    async def receive() -> None:
        nonlocal buffered, eof
        try:
            while True:
                await room.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                pending.append((time.monotonic() + delay_s, data))
                buffered += len(data)
                if buffered > MAX_BUFFERED:
                    room.clear()
                arrived.set()
        finally:
            eof = True
            arrived.set()

    async def send() -> None:
        nonlocal buffered
        while True:
            if not pending:
                if eof:
                    return
                arrived.clear()
                await arrived.wait()
                continue
            due = pending[0][0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            batch = []
            while pending and pending[0][0] <= now:
                batch.append(pending.popleft()[1])
            size = sum(map(len, batch))
            buffered -= size
            if buffered <= MAX_BUFFERED:
                room.set()
            writer.write(b"".join(batch) if len(batch) > 1 else batch[0])
            await writer.drain()

    receiver = asyncio.create_task(receive())
    try:
        await send()
    finally:
        receiver.cancel()
        _half_close(writer)


def _half_close(writer: asyncio.StreamWriter) -> None:
    try:
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        pass


class DelayRelay:
    """Listen on `listen`, connect each accepted connection to `target`, delay both ways."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_ms: float):
        if delay_ms < 0:
            raise WpkError(f"relay delay must be >= 0 ms, got {delay_ms}")
        self.listen, self.target, self.delay_s = listen, target, delay_ms / 1e3
        self.server: asyncio.base_events.Server | None = None

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        _nodelay(client_writer)
        _nodelay(upstream_writer)
        try:
            await asyncio.gather(_pump(client_reader, upstream_writer, self.delay_s),
                                 _pump(upstream_reader, client_writer, self.delay_s))
        except (ConnectionError, OSError):
            pass
        finally:
            for writer in (client_writer, upstream_writer):
                writer.close()

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, *self.listen,
                                                 reuse_address=True)
        return self.server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise WpkError(f"{what}: expected HOST:PORT, got {text!r}")
    return host, int(port)


def precise_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire within ~0.2 ms (see the module docstring)."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


async def _serve(relays: list[DelayRelay]) -> None:
    addresses = [await relay.start() for relay in relays]
    print("ready " + " ".join(f"{host}:{port}" for host, port in addresses), flush=True)
    await asyncio.Event().wait()


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wpk-delay-relay", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, action="append",
                        help="HOST:PORT to accept on (port 0: any); repeatable, one per --to")
    parser.add_argument("--to", required=True, action="append",
                        help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True,
                        help="one-way delay added in each direction (RTT/2)")
    args = parser.parse_args(argv)
    if len(args.listen) != len(args.to):
        raise WpkError(f"{len(args.listen)} --listen for {len(args.to)} --to: give them in "
                       "pairs")
    relays = [DelayRelay(parse_hostport(listen, "--listen"), parse_hostport(to, "--to"),
                         args.delay_ms) for listen, to in zip(args.listen, args.to)]
    loop = precise_event_loop()
    try:
        loop.run_until_complete(_serve(relays))
    except OSError as error:
        routes = ", ".join(f"{a} -> {b}" for a, b in zip(args.listen, args.to))
        raise WpkError(f"relay {routes}: {error}") from None
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
