"""Inference messages whose tensor bytes protobuf never copies: written with one copy
(`Prebuilt`), read in place (`Received`). The bytes on the wire are exactly protobuf's.

Writing: building a protobuf ModelInferRequest from arrays copies each tensor three times
(tobytes, into the message, SerializeToString): ~0.5 ms per MB here. A `Prebuilt` keeps the
small protobuf part (names, shapes, parameters) as a message and the tensor data as buffers,
and writes the wire format itself: the message's bytes, then each buffer as one more entry of
the repeated `bytes` field (protobuf concatenates repeated fields), joined in one copy.

Reading: parsing a ModelInferRequest with protobuf copies each raw tensor twice (into the
message, and again into a Python `bytes` when `raw_input_contents[i]` is read), and its
`ByteSize()` costs as much again: ~0.4 ms per 1.5 MB received here. A `Received` message
splits the wire bytes gRPC hands us instead: the entries of the repeated raw-contents field
become memoryviews of those bytes (`np.frombuffer` reads them in place), and the small rest
(names, shapes, parameters) is parsed by protobuf. Any other field order or wire type parses
the same; input protobuf would reject (truncated, bad tag) falls back to protobuf's own
parser so that the error is protobuf's.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

RAW_INPUT_FIELD = 7        # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6       # ModelInferResponse.raw_output_contents
STREAM_RESPONSE_FIELD = 2  # ModelStreamInferResponse.infer_response


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Prebuilt:
    """`message` (a protobuf without raw contents) + `buffers` for repeated bytes field
    `field`; optionally wrapped as field `wrap_field` of an outer message."""

    __slots__ = ("message", "field", "buffers", "wrap_field")

    def __init__(self, message, field: int, buffers: Sequence, wrap_field: int | None = None):
        self.message = message
        self.field = field
        self.buffers = list(buffers)
        self.wrap_field = wrap_field

    def __getattr__(self, name: str):  # model_name, id, parameters, inputs, outputs...
        return getattr(self.message, name)

    def __setattr__(self, name: str, value) -> None:
        if name in Prebuilt.__slots__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.message, name, value)

    @property
    def nbytes(self) -> int:
        return sum(memoryview(b).nbytes for b in self.buffers)

    def serialize(self) -> bytes:
        tag = varint(self.field << 3 | 2)
        parts = [self.message.SerializeToString()]
        for buffer in self.buffers:
            view = memoryview(buffer)
            if view.ndim != 1 or view.format != "B":
                view = memoryview(np.ascontiguousarray(buffer).reshape(-1).view(np.uint8))
            parts += [tag, varint(view.nbytes), view]
        if self.wrap_field is None:
            return b"".join(parts)
        size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        return b"".join([varint(self.wrap_field << 3 | 2), varint(size), *parts])


def serialize(message) -> bytes:
    """gRPC serializer accepting protobuf messages and Prebuilt ones."""
    if type(message) is Prebuilt:
        return message.serialize()
    return message.SerializeToString()


class _Malformed(Exception):
    pass


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


Spans = list[tuple[int, int]]


def _split(data: bytes, field: int) -> tuple[Spans, Spans]:
    """(value spans of length-delimited `field`, spans of every other field's bytes) in
    `data`; raises _Malformed where the wire format breaks."""
    found: Spans = []
    rest: Spans = []
    pos, end = 0, len(data)
    while pos < end:
        tag_start = pos
        tag, pos = _varint(data, pos, end)
        wire_type = tag & 7
        if wire_type == 0:
            _, pos = _varint(data, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(data, pos, end)
            if tag >> 3 == field:
                if pos + length > end:
                    raise _Malformed
                found.append((pos, pos + length))
                pos += length
                continue
            pos += length
        else:  # groups (3/4) and invalid wire types: let protobuf decide
            raise _Malformed
        if pos > end:
            raise _Malformed
        if rest and rest[-1][1] == tag_start:
            rest[-1] = (rest[-1][0], pos)
        else:
            rest.append((tag_start, pos))
    return found, rest


class Received:
    """A parsed protobuf `message` plus its raw contents as `buffers` (memoryviews of the
    received bytes), exposed under the raw-contents field's name; every other attribute is
    the message's. `nbytes`: the size of the whole message on the wire."""

    __slots__ = ("message", "raw_name", "buffers", "nbytes")

    def __init__(self, message, raw_name: str, buffers: list, nbytes: int):
        object.__setattr__(self, "message", message)
        object.__setattr__(self, "raw_name", raw_name)
        object.__setattr__(self, "buffers", buffers)
        object.__setattr__(self, "nbytes", nbytes)

    def __getattr__(self, name: str):
        if name == self.raw_name:
            return self.buffers
        return getattr(self.message, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.message, name, value)


def _parser(cls, field: int, raw_name: str) -> Callable[[bytes], object]:
    """gRPC deserializer for `cls` that leaves the entries of raw-contents `field` in the
    received bytes (a `Received`); protobuf parses the rest, and anything malformed whole."""

    def parse(data: bytes):
        try:
            found, rest = _split(data, field)
        except _Malformed:
            return cls.FromString(data)
        view = memoryview(data)
        return Received(cls.FromString(b"".join(data[a:b] for a, b in rest)), raw_name,
                        [view[a:b] for a, b in found], len(data))

    return parse


def request_parser(cls) -> Callable[[bytes], object]:
    """For ModelInferRequest (class `cls`): raw inputs read in place."""
    return _parser(cls, RAW_INPUT_FIELD, "raw_input_contents")


def response_parser(cls) -> Callable[[bytes], object]:
    """For ModelInferResponse (class `cls`): raw outputs read in place."""
    return _parser(cls, RAW_OUTPUT_FIELD, "raw_output_contents")
