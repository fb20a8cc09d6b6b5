"""Request and tensor parameters: the protocol's `map<string, InferParameter>` to and from
Python values (shared by the wire format and the shared-memory extension)."""
from __future__ import annotations


def set_parameter(target, key: str, value: str | float | bool | int) -> None:
    """Store a Python value in a protobuf `map<string, InferParameter>`."""
    param = target[key]
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def parameter_value(param):
    choice = param.WhichOneof("parameter_choice")
    return getattr(param, choice) if choice else None
