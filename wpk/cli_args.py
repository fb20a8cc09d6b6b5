"""argparse value types shared by the command-line tools: a bad value is refused at parse
time in one line (`argument --port: 70000 is not a port number (0-65535)`), never wrapped
around or caught halfway through a run."""
from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be more than 0")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be 0 or more")
    return value


def host_port(text: str) -> str:
    """HOST:PORT with a host and a port 1-65535 (IPv6 hosts in brackets: [::1]:8001)."""
    host, sep, number = text.rpartition(":")
    if not sep or not host.strip("[]"):
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    value = _number(number, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: {value} is not a port number (1-65535)")
    return text
