"""argparse value types shared by the command-line tools: a bad value is refused at parse
time in one line (`argument --port: 70000 is not a port number (0-65535)`), never wrapped
around or caught halfway through a run."""
from __future__ import annotations

import argparse
import math
import os


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


def _bounded(kind: type, low: int, strict: bool, rule: str, name: str):
    """An argparse type: a `kind` number at least `low` (more than `low` when `strict`)."""
    def parse(text: str):
        value = _number(text, kind)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{value:g} {rule}")
        return value

    parse.__name__ = name
    return parse


def int_between(low: int, high: int, why: str):
    """An argparse type: an integer from `low` to `high`; `why` says where `high` comes
    from."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high} ({why})")
        return value

    parse.__name__ = f"int_between_{low}_{high}"
    return parse


positive_int = _bounded(int, 1, False, "must be at least 1", "positive_int")
non_negative_int = _bounded(int, 0, False, "must be 0 or more", "non_negative_int")
positive_float = _bounded(float, 0, True, "must be more than 0", "positive_float")
non_negative_float = _bounded(float, 0, False, "must be 0 or more", "non_negative_float")


def split_host_port(text: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port): a host (IPv6 in brackets, [::1]:8001, returned without
    them) and a port 1-65535 in digits; ArgumentTypeError saying which part is wrong."""
    host, sep, number = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: {number!r} is not a port number")
    if not 1 <= int(number) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: {int(number)} is not a port number "
                                         f"(1-65535)")
    return host, int(number)


def host_port(text: str) -> str:
    """An argparse type: HOST:PORT (see split_host_port), kept as the user wrote it."""
    split_host_port(text)
    return text


# More intra-op threads than this only slow ONNX Runtime down, and a huge count makes it
# spend minutes starting threads before the first run.
MAX_THREADS = 4 * (os.cpu_count() or 1)
threads = int_between(0, MAX_THREADS, f"0 picks one per physical core; at most 4 x this "
                                      f"machine's {os.cpu_count() or 1} logical cores")


def documented_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose description is `doc`'s first line and whose epilog is the rest after
    the blank line (usage examples kept as written): a command's module docstring is its
    --help."""
    lines = doc.splitlines()
    return argparse.ArgumentParser(prog=prog, description=lines[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(lines[2:]))
