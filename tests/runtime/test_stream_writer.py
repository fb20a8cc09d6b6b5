"""StreamWriter: one writer at a time, messages in order, other senders never wait."""
import asyncio

import pytest

from wpk.runtime import protocol as pb
from wpk.runtime.stream_writer import StreamWriter


def test_messages_go_out_in_order_and_only_the_first_sender_waits():
    async def scenario():
        written, gate = [], asyncio.Event()

        async def write(data: bytes) -> None:
            await gate.wait()  # a slow write completion
            written.append(pb.ModelInferRequest.FromString(data).id)

        outbox = StreamWriter(write, lambda error: pytest.fail(f"unexpected {error!r}"))
        message = pb.ModelInferRequest(id="1")
        first = asyncio.ensure_future(outbox.send(message))
        await asyncio.sleep(0)
        for n in "234":
            message.id = n  # serialized when sent: reusing the object is fine
            await asyncio.wait_for(outbox.send(message), 1)  # returns at once: queued
        assert not first.done() and written == []
        gate.set()
        await first
        await outbox.flush()
        return written

    assert asyncio.run(scenario()) == ["1", "2", "3", "4"]


def test_a_failed_write_is_reported_once_and_later_messages_are_dropped():
    async def scenario():
        errors = []

        async def write(data: bytes) -> None:
            raise RuntimeError("stream gone")

        outbox = StreamWriter(write, errors.append)
        await outbox.send(pb.ModelInferRequest(id="1"))
        await outbox.send(pb.ModelInferRequest(id="2"))
        await outbox.flush()
        return errors

    errors = asyncio.run(scenario())
    assert [str(e) for e in errors] == ["stream gone"]


def test_a_cancelled_writer_hands_the_queue_on():
    async def scenario():
        written, gate = [], asyncio.Event()

        async def write(data: bytes) -> None:
            if not written:
                written.append("started")
                await gate.wait()
            written.append(pb.ModelInferRequest.FromString(data).id)

        outbox = StreamWriter(write, lambda error: None)
        first = asyncio.ensure_future(outbox.send(pb.ModelInferRequest(id="1")))
        await asyncio.sleep(0)
        await outbox.send(pb.ModelInferRequest(id="2"))
        first.cancel()
        await asyncio.wait_for(outbox.flush(), 1)
        return written

    assert asyncio.run(scenario()) == ["started", "2"]
