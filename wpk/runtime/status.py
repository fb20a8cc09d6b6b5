"""`TierError`: the one exception a request ends with, carrying its status.

Raised by the tier core, the links to the next tier, the clients and the shared-memory
registry alike. The code is a `grpc.StatusCode` because that is the protocol's status
vocabulary (the tensor link carries the same numbers); only the gRPC servicer turns it into
a gRPC status (`context.abort`).
"""
from __future__ import annotations

import grpc

from wpk.runtime.tensors import TensorError


class TierError(Exception):
    """A failed request: `code` (grpc.StatusCode) and `details` (the message the caller
    gets, naming the tier where it failed)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def failure(error: Exception, where: str) -> TierError:
    """Any exception as the status a caller gets: a TierError as it is, a bad tensor
    INVALID_ARGUMENT, anything else INTERNAL naming `where` (every request gets an answer)."""
    if isinstance(error, TierError):
        return error
    if isinstance(error, TensorError):
        return TierError(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    return TierError(grpc.StatusCode.INTERNAL, f"{where}: {error!r}")


def code_of(number: object) -> grpc.StatusCode:
    """The status with this number (as a wire format carries it); UNKNOWN for any other."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
