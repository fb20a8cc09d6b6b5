"""The tensor link's wire format: length-prefixed binary frames over one TCP connection.

    header  struct HEADER (36 bytes, little-endian):
            magic b"WPK1", kind (1 request, 2 answer, 3 lane open, 4 request with its payload in
            the connection's lane: see lane), status (gRPC code number, 0 = OK),
            2 spare bytes, meta_len (u32), request id (u64), timeout_ms (f64; < 0: none),
            payload_len (u64)
    meta    JSON (UTF-8), meta_len bytes: a request {"m": model, "t": [descriptor...]}
            (a tier's request runs the pipeline from the tier serving the model; with
            "k": 1, a client's, the model answers as ModelInfer would: a slice model its
            slice's outputs), an answer {"t": [descriptor...]} or, when status != 0,
            {"e": message};
            descriptor = [name, datatype, shape, codec, scale, nbytes] (codec "raw": plain
            row-major bytes; scale: the int8 codec's, else 0)
    payload the tensors' bytes, one after the other in descriptor order (payload_len bytes)

Sending writes the header+meta and every tensor's own buffer with one `sendmsg` (no joining
copy). Receiving reads through a staging buffer (one `recv_into` usually brings a small frame
whole, header included) and lands each payload in a fresh buffer that the arrays are then
views of (np.frombuffer: no copy), so they stay valid while the frame's request is alive.
"""
from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from wpk.runtime.codecs import CODEC_PARAM, SCALE_PARAM, DecodeError, Encoder, decode
from wpk.runtime.tensors import TensorError, array_from_raw, check_tensor, datatype_of, dtype_of
from wpk.tensor_spec import TensorSpec

MAGIC = b"WPK1"
HEADER = struct.Struct("<4sBBHIQdQ")
REQUEST, ANSWER, LANE_OPEN, LANE_REQUEST = 1, 2, 3, 4
KINDS = (REQUEST, ANSWER, LANE_OPEN, LANE_REQUEST)
STAGING_BYTES = 256 * 1024
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024   # as gRPC's default largest message (wpk-serve
# --max-message-mb sets a tier's): a frame declaring more is refused before any allocation


class FrameError(Exception):
    """The byte stream is not a valid frame sequence: the connection must be dropped."""


@dataclass
class Frame:
    kind: int
    status: int                  # gRPC status code number; 0 = OK
    request_id: int
    timeout_ms: float            # < 0: no deadline
    meta: dict
    payload: np.ndarray          # uint8, the tensors' bytes

    @property
    def nbytes(self) -> int:
        return int(self.payload.nbytes)

    def arrays(self, model: str, expected: Mapping[str, TensorSpec] | None = None
               ) -> dict[str, np.ndarray]:
        """The frame's tensors, decoded and (with `expected`) checked like a ModelInfer
        request's inputs; raises TensorError naming the model and tensor."""
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, datatype, shape, codec, scale, nbytes in self.meta.get("t", ()):
            shape = tuple(shape)
            data = self.payload[offset:offset + nbytes]
            offset += nbytes
            if expected is not None:
                meta = expected.get(name)
                if meta is None:
                    raise TensorError(f"model {model!r} has no input {name!r} "
                                      f"(inputs: {', '.join(expected)})")
                check_tensor(model, meta, datatype, shape)
            if codec == "raw":
                out[name] = array_from_raw(model, name, datatype, shape, data)
            else:
                try:
                    out[name] = decode(data, dtype_of(datatype), shape, codec, scale or None)
                except DecodeError as error:
                    raise TensorError(f"model {model!r} input {name!r}: {error}") from None
        if expected is not None:
            missing = [n for n in expected if n not in out]
            if missing:
                raise TensorError(f"model {model!r}: missing input"
                                  f"{'s' if len(missing) > 1 else ''} "
                                  f"{', '.join(repr(m) for m in missing)}")
        return out


def _buffer(array) -> memoryview:
    """A flat byte view of a C-contiguous array (or bytes) without copying."""
    if isinstance(array, np.ndarray):
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        if array.size:
            return memoryview(array).cast("B")
        return memoryview(b"")
    return memoryview(array).cast("B")


class _Cache(dict):
    """A bounded memo: requests of one model repeat the same names, dtypes and shapes, so
    their metadata is encoded and decoded once (JSON stays cheap to read and to debug)."""

    LIMIT = 256

    def put(self, key, value):
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = value
        return value


_encoded = _Cache()   # (model, ((name, dtype, shape), ...)) -> (meta bytes, payload size)
_decoded = _Cache()   # meta bytes -> (meta dict, payload size)


def _meta_bytes(meta: dict) -> bytes:
    return json.dumps(meta, separators=(",", ":")).encode()


def encode(kind: int, request_id: int, arrays: Mapping[str, np.ndarray] | None, *,
           model: str | None = None, timeout_ms: float = -1.0, status: int = 0,
           error: str | None = None, encoder: Encoder | None = None,
           kserve: bool = False) -> list:
    """Buffers of one frame, ready for `send_parts` (tensor buffers are not copied; with an
    `encoder` each tensor is encoded first). `kserve`: a client's request (meta "k")."""
    if error is not None:
        meta_bytes, parts, payload = _meta_bytes({"e": error}), [], 0
    elif encoder is None:  # plain raw tensors: the metadata depends on shapes only
        arrays = arrays or {}
        parts = [_buffer(array) for array in arrays.values()]
        key = (model, kserve,
               tuple((name, array.dtype, array.shape) for name, array in arrays.items()))
        known = _encoded.get(key)
        if known is None:
            descriptors = [[name, datatype_of(array.dtype), list(array.shape), "raw", 0.0,
                            part.nbytes] for (name, array), part in zip(arrays.items(), parts)]
            known = _encoded.put(key, (_meta_bytes(_tensor_meta(descriptors, model, kserve)),
                                       sum(p.nbytes for p in parts)))
        meta_bytes, payload = known
    else:
        descriptors, parts = [], []
        for name, array in (arrays or {}).items():
            encoded, params = encoder.encode(array)
            data = _buffer(encoded)
            descriptors.append([name, datatype_of(array.dtype), list(array.shape),
                                str(params.get(CODEC_PARAM, "raw")),
                                float(params.get(SCALE_PARAM, 0.0)), data.nbytes])
            parts.append(data)
        meta_bytes = _meta_bytes(_tensor_meta(descriptors, model, kserve))
        payload = sum(p.nbytes for p in parts)
    header = HEADER.pack(MAGIC, kind, status, 0, len(meta_bytes), request_id, timeout_ms,
                         payload)
    return [header + meta_bytes, *parts]


def _tensor_meta(descriptors: list, model: str | None, kserve: bool) -> dict:
    """A request's or an answer's meta (see the module's doc)."""
    meta: dict = {"t": descriptors}
    if model is not None:
        meta["m"] = model
    if kserve:
        meta["k"] = 1
    return meta


def encode_meta(kind: int, request_id: int, meta: dict) -> list:
    """Buffers of a frame that carries metadata alone (LANE_OPEN)."""
    meta_bytes = _meta_bytes(meta)
    return [HEADER.pack(MAGIC, kind, 0, 0, len(meta_bytes), request_id, -1.0, 0) + meta_bytes]


def _parse_meta(data: bytes) -> tuple[dict, int]:
    """(metadata, payload bytes it declares); raises FrameError. Do not change the dict: it
    is shared by every frame with the same metadata."""
    known = _decoded.get(data)
    if known is not None:
        return known
    try:
        meta = json.loads(data)
        sizes = [int(d[5]) for d in meta.get("t", ())]
    except (ValueError, AttributeError, TypeError, IndexError, RecursionError):
        raise FrameError("frame metadata is malformed") from None
    if any(size < 0 for size in sizes):
        raise FrameError("frame metadata declares a negative tensor size")
    declared = sum(sizes)
    if "e" in meta:  # error messages vary: not worth keeping
        return meta, declared
    return _decoded.put(data, (meta, declared))


def unsent(views: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of `views` after a write that took their first `sent` bytes: the
    buffers that went out whole are dropped, a partly sent one resumes where it stopped."""
    done = 0
    while done < len(views) and sent >= views[done].nbytes:
        sent -= views[done].nbytes
        done += 1
    rest = views[done:]
    if rest and sent:
        rest[0] = rest[0][sent:]
    return rest


MAX_IOV = 512   # buffers per sendmsg (Linux refuses more than IOV_MAX, 1024)


def send_nowait(sock: socket.socket, views: list[memoryview]) -> list[memoryview]:
    """Send what the socket takes now, without waiting (at most MAX_IOV buffers); returns
    the views of what is left. Raises OSError when the connection failed."""
    now, later = views[:MAX_IOV], views[MAX_IOV:]
    try:
        sent = sock.sendmsg(now, (), socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        sent = 0
    return unsent(now, sent) + later


def send_parts(sock: socket.socket, parts: Sequence) -> int:
    """Write every buffer of `parts` (one sendmsg per MAX_IOV buffers, more only after a
    partial write); returns the bytes sent."""
    views = [memoryview(p) for p in parts]
    total = sum(v.nbytes for v in views)
    while views:
        now = views[:MAX_IOV]
        views = unsent(now, sock.sendmsg(now)) + views[MAX_IOV:]
    return total


class FrameReader:
    """Reads frames from a blocking socket, one per `read()`; raises EOFError when the peer
    closed, FrameError on bytes that are not frames."""

    def __init__(self, sock: socket.socket, staging: int = STAGING_BYTES,
                 max_payload: int = MAX_PAYLOAD_BYTES):
        self.sock = sock
        self.max_payload = max_payload
        self.buffer = bytearray(staging)
        self.view = memoryview(self.buffer)
        self.start = self.end = 0      # unread bytes: buffer[start:end]
        self._frame: Frame | None = None   # a frame whose payload is still arriving ...
        self._target: memoryview | None = None  # ... into this rest of it

    def read(self) -> Frame:
        while True:
            frame = self._step()
            if frame is not None:
                return frame

    def _step(self) -> Frame | None:
        """Progress by at most one recv; a frame when one is complete."""
        if self._target is not None:  # a large payload lands in place, no staging
            got = self.sock.recv_into(self._target)
            if not got:
                raise EOFError("connection closed")
            self._target = self._target[got:]
            if self._target.nbytes:
                return None
            frame, self._frame, self._target = self._frame, None, None
            return frame
        frame = self._staged()
        if frame is not None or self._target is not None:
            return frame
        if self.start:  # move what is left to the front
            left = self.end - self.start
            self.view[:left] = self.view[self.start:self.end]
            self.start, self.end = 0, left
        got = self.sock.recv_into(self.view[self.end:])
        if not got:
            raise EOFError("connection closed")
        self.end += got
        return None

    def _staged(self) -> Frame | None:
        """The next frame, when its header and metadata are staged (its payload then goes
        to `_target` if it is not staged whole); None when more bytes are needed first."""
        available = self.end - self.start
        if available < HEADER.size:
            return None
        magic, kind, status, _, meta_len, request_id, timeout_ms, payload_len = \
            HEADER.unpack_from(self.buffer, self.start)
        if magic != MAGIC or kind not in KINDS:
            raise FrameError("not a wpk tensor-link frame")
        if meta_len > len(self.buffer) - HEADER.size:
            raise FrameError(f"frame metadata of {meta_len} bytes is over the limit of "
                             f"{len(self.buffer) - HEADER.size} bytes")
        if available < HEADER.size + meta_len:
            return None
        begin = self.start + HEADER.size
        meta, declared = _parse_meta(self.view[begin:begin + meta_len].tobytes())
        if declared != payload_len and kind != LANE_REQUEST:  # (its payload: an offset)
            raise FrameError("frame payload does not match its tensor descriptors")
        if payload_len > self.max_payload:
            raise FrameError(f"frame payload of {payload_len} bytes is over the limit of "
                             f"{self.max_payload} bytes")
        self.start = begin + meta_len
        payload = np.empty(payload_len, dtype=np.uint8)
        staged = min(self.end - self.start, payload_len)
        if staged:
            payload[:staged] = np.frombuffer(self.buffer, np.uint8, staged, self.start)
            self.start += staged
        frame = Frame(kind, status, request_id, timeout_ms, meta, payload)
        if staged < payload_len:
            self._frame, self._target = frame, memoryview(payload)[staged:]
            return None
        return frame
