"""Shared-memory lanes: the tensor link's payloads between tiers on one host, without TCP.

Loopback TCP copies a frame's payload twice (into the kernel, out of it) and pays the TCP
stack on every 64 KB: a 0.8 MB tensor cost the sending tier 0.7 ms of CPU on a 2-core
machine, more than a memcpy by 30x. A lane is a POSIX shared-memory object that the sending
side of a connection creates and the receiving tier maps read-only; a large request's
payload is copied into one of the lane's slots and the frame on the socket carries only
where it lies. The receiver's arrays are views of the slot (no copy: ONNX Runtime reads the
lane), so a slot is reused only after its request's answer has come back, late answers
included: a request that expired may still be read.

Only connections over loopback are given lanes (over_loopback): a next tier
reached over a network keeps that network's cost, also where it shares this host's /dev/shm
(wpk-emulate's shaped links between network namespaces). The sender opens a lane with a
LANE_OPEN frame (meta {"lane": name, "bytes": size, "slot": slot size}) once the connection
carries a payload of LANE_MIN_BYTES or more; the receiver maps the object, unlinks its name
and answers OK, or fails (another host, another /dev/shm, lanes disabled), and the
connection then goes on sending payloads inline. Once mapped, the memory lives on in both
processes and nothing is left in /dev/shm; a sender killed in the moment between creating
the object and the receiver mapping it leaves a name behind, which the next process that
creates a lane removes (the name carries the creator's pid).

Trust: the receiver maps only regular files owned by its own user, opened without following
links, from a peer on loopback. A peer running as that same user could still shrink the
object after the receiver mapped it, and the receiver would then die of SIGBUS reading it;
such a peer can harm the tier in many other ways, and `--no-shared-memory` refuses lanes.
"""
from __future__ import annotations

import ipaddress
import mmap
import os
import re
import secrets
import socket
import stat
import struct
import threading
from typing import Sequence

import numpy as np

from wpk.runtime.link_frames import HEADER, LANE_REQUEST, REQUEST, Frame, FrameError

SHM_DIR = "/dev/shm"
PREFIX = "wpk-lane-"
NAME = re.compile(r"wpk-lane-[0-9a-f-]{1,64}")
LANE_MIN_BYTES = 64 * 1024       # smaller payloads go inline: TCP is as cheap as a slot there
LANE_SLOTS = 8                   # requests in flight with their payload in the lane; more go
MAX_LANE_BYTES = 256 * 1024 * 1024   # inline (Docker's /dev/shm is 64 MB by default: a
# lane that does not fit is not created, posix_fallocate says so before any page is used)
SLOT_ALIGN = 64 * 1024
_OFFSET = struct.Struct("<Q")    # a LANE_REQUEST's payload on the socket: the slot's offset
_swept = False


def _sweep_dead_lanes() -> None:
    """Remove the names of lanes whose creator died before its receiver mapped them (once per
    process; only our own user's)."""
    global _swept
    if _swept:
        return
    _swept = True
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        if not NAME.fullmatch(name):
            continue
        try:
            pid = int(name[len(PREFIX):].split("-")[0], 16)
            os.kill(pid, 0)
        except ProcessLookupError:   # its creator is gone
            path = os.path.join(SHM_DIR, name)
            try:
                if os.lstat(path).st_uid == os.geteuid():
                    os.unlink(path)
            except OSError:
                pass
        except (ValueError, OSError):   # alive, or not ours to signal
            continue


def over_loopback(sock: socket.socket) -> bool:
    """Whether `sock` reaches its peer over loopback: only such a connection gets a lane, on
    either side. A tier reached over a network, even one on this host (another network
    namespace, a shaped link in wpk-emulate), keeps that network's cost."""
    try:
        return ipaddress.ip_address(sock.getpeername()[0]).is_loopback
    except (OSError, ValueError, IndexError):
        return False


class LaneWriter:
    """The sending side: a lane of LANE_SLOTS slots of `slot_bytes`, created now (raises
    OSError when /dev/shm cannot hold it). Not usable until `attached()` (the receiver's
    OK). Thread-safe: a connection's senders on several threads place concurrently."""

    def __init__(self, slot_bytes: int, slots: int = LANE_SLOTS):
        self.slot_bytes = -(-slot_bytes // SLOT_ALIGN) * SLOT_ALIGN
        self.size = self.slot_bytes * slots
        if self.size > MAX_LANE_BYTES:
            raise OSError(f"a lane of {self.size} bytes is over {MAX_LANE_BYTES}")
        if not hasattr(os, "posix_fallocate"):   # not Linux: no lanes, payloads go inline
            raise OSError("no posix_fallocate on this system")
        _sweep_dead_lanes()
        self.name = f"{PREFIX}{os.getpid():x}-{secrets.token_hex(8)}"
        self.path = os.path.join(SHM_DIR, self.name)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.size)   # ENOSPC now, never SIGBUS later
            self.mapping = mmap.mmap(fd, self.size)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.memory = np.frombuffer(self.mapping, np.uint8)
        self.ready = False
        self.free = list(range(slots))
        self.held: dict[int, int] = {}     # request id -> its slot
        self.placed = 0                    # payloads sent through the lane
        self.lock = threading.Lock()

    def open_meta(self) -> dict:
        return {"lane": self.name, "bytes": self.size, "slot": self.slot_bytes}

    def attached(self, ok: bool) -> None:
        """The receiver's answer to LANE_OPEN: the name goes either way (the receiver has
        unlinked it already if it mapped the lane); a refused lane gives its pages back
        (reserved in /dev/shm, they would be held as long as the connection lives)."""
        self.unlink()
        self.ready = ok
        if not ok:
            self.memory = None   # nothing was placed: no view of the mapping is left
            self.mapping.close()

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def place(self, request_id: int, parts: Sequence) -> list | None:
        """A request frame's `parts` (from link_frames.encode) with the payload copied into a free
        slot: a LANE_REQUEST frame whose socket payload is the slot's offset. None: send it
        inline (lane not ready, payload too small or too large, every slot in use)."""
        if not self.ready:
            return None
        views = [memoryview(p).cast("B") for p in parts[1:]]
        payload = sum(v.nbytes for v in views)
        if payload < LANE_MIN_BYTES or payload > self.slot_bytes:
            return None
        with self.lock:
            if not self.free:
                return None
            slot = self.free.pop()
            self.held[request_id] = slot
        offset = slot * self.slot_bytes
        at = offset
        for view in views:
            self.memory[at:at + view.nbytes] = np.frombuffer(view, np.uint8)
            at += view.nbytes
        head = bytearray(parts[0])
        magic, _, status, spare, meta_len, rid, timeout_ms, _ = HEADER.unpack_from(head)
        HEADER.pack_into(head, 0, magic, LANE_REQUEST, status, spare, meta_len, rid,
                         timeout_ms, _OFFSET.size)
        self.placed += 1
        return [head, _OFFSET.pack(offset)]

    def release(self, request_id: int) -> None:
        """The request's answer came (in time or late): its slot may be reused."""
        with self.lock:
            slot = self.held.pop(request_id, None)
            if slot is not None:
                self.free.append(slot)

    def close(self) -> None:
        self.ready = False
        self.unlink()


class LaneReader:
    """The receiving side: the sender's lane mapped read-only. Raises OSError when it cannot
    be opened (not on this host) and FrameError for a name that is not a lane's."""

    def __init__(self, meta: dict):
        name, size, slot = meta.get("lane"), meta.get("bytes"), meta.get("slot")
        if not isinstance(name, str) or not NAME.fullmatch(name) or \
                not isinstance(size, int) or not 0 < size <= MAX_LANE_BYTES or \
                not isinstance(slot, int) or not 0 < slot <= size or size % slot:
            raise FrameError("malformed lane")
        path = os.path.join(SHM_DIR, name)
        # no links followed, and a FIFO under that name cannot block the open
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid():
                raise OSError(f"{path} is not a lane of this user")
            if status.st_size != size:
                raise OSError(f"lane {name} is not {size} bytes")
            mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            os.unlink(path)   # mapped: the name is no longer needed (see the module's doc)
        except OSError:
            pass
        self.memory = np.frombuffer(mapping, np.uint8)   # holds the mapping
        self.slot_bytes = slot

    def resolve(self, frame: Frame, max_payload: int) -> Frame:
        """A LANE_REQUEST frame as a plain request whose payload is a view of its slot;
        `max_payload`: the tier's largest payload, as for frames on the socket."""
        if frame.payload.nbytes != _OFFSET.size:
            raise FrameError("lane request without its offset")
        offset = _OFFSET.unpack(frame.payload.tobytes())[0]
        declared = sum(int(d[5]) for d in frame.meta.get("t", ()))
        if offset % self.slot_bytes or offset + declared > self.memory.nbytes or \
                declared > self.slot_bytes:
            raise FrameError("lane request outside its slot")
        if declared > max_payload:
            raise FrameError(f"frame payload of {declared} bytes is over the limit of "
                             f"{max_payload} bytes")
        frame.payload = self.memory[offset:offset + declared]
        frame.kind = REQUEST
        return frame
