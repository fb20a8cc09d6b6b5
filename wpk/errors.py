"""The one exception type that command-line tools turn into a one-line message."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class WpkError(Exception):
    """A problem with the user's input (file, tensor, tier, constraint), stated in one line."""


def cli_entry(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI `main` so that a WpkError prints `wpk: error: ...` and exits 2, no traceback."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except WpkError as error:
            print(f"wpk: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("wpk: interrupted", file=sys.stderr)
            return 130

    return wrapped
