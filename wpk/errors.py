"""The one exception type that command-line tools turn into a one-line message."""
from __future__ import annotations

import contextlib
import difflib
import functools
import re
import sys
import warnings
from typing import Callable, Iterable, Iterator, Mapping


class WpkError(Exception):
    """A problem with the user's input (file, tensor, tier, constraint), stated in one line."""


class ParameterError(WpkError):
    """A bad value of a library function's parameter, in the words of whoever set it.

    `template` names each parameter in braces (`"{max_latency_ms} must be positive"`; other
    braces are left alone): the message a Python caller reads spells it as the parameter
    (`max_latency_ms`); a command-line tool whose flag set it re-raises it spelled as the
    flag (`flags_for`)."""

    def __init__(self, template: str, *parameters: str):
        self.template, self.parameters = template, parameters
        super().__init__(self._spelled({name: name for name in parameters}))

    def _spelled(self, names: Mapping[str, str]) -> str:
        text = self.template
        for parameter, name in names.items():
            text = text.replace("{" + parameter + "}", name)
        return text

    def naming_flags(self, flags: Mapping[str, str] | None = None) -> WpkError:
        """The same message with each parameter as its flag (`flags`, else --dashed-name)."""
        flags = flags or {}
        return WpkError(self._spelled({
            name: flags.get(name, "--" + name.replace("_", "-")) for name in self.parameters}))


@contextlib.contextmanager
def flags_for(flags: Mapping[str, str] | None = None) -> Iterator[None]:
    """In a command-line tool: a ParameterError from the library it calls names the flags
    (`flags`: parameter -> flag where it is not --dashed-name)."""
    try:
        yield
    except ParameterError as error:
        raise error.naming_flags(flags) from None


def cli_entry(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI `main` so that a WpkError, or an OSError (a file or port the user named that
    cannot be used), prints `wpk: error: ...` and exits 2, no traceback."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except WpkError as error:
            print(f"wpk: error: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # a path or port the tool could not use: the system's words
            print(f"wpk: error: {os_error_line(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("wpk: interrupted", file=sys.stderr)
            return 130

    return wrapped


def os_error_line(error: OSError) -> str:
    """`PATH: reason` for an OSError about a file (`out/x: Is a directory`), else its text."""
    reason = error.strerror or str(error)
    if error.filename is None:
        return reason
    other = f" -> {error.filename2}" if error.filename2 is not None else ""
    return f"{error.filename}{other}: {reason}"


def ort_error_line(error: BaseException, limit: int = 300) -> str:
    """ONNX Runtime's message without its wrapping: no `[ONNXRuntimeError] : 1 : FAIL :`
    prefix, no source path and C++ signature before the words that say what went wrong."""
    text = " ".join(str(error).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ (?:[^()]*\((?:[^()]|\([^()]*\))*\) )?", "", text)
    text = text or type(error).__name__
    if len(text) > limit:  # ORT puts what to do last ("... support is till opset 28."): keep it
        sentences = re.split(r"(?<=\.) ", text)
        short = f"{sentences[0]} ... {sentences[-1]}"
        text = short if len(sentences) > 2 and len(short) <= limit else text[:limit]
    return text


def print_warning(message: str) -> None:
    """`wpk: warning: MESSAGE` on stderr, one line."""
    print(f"wpk: warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def one_line_warnings(category: type[Warning] = Warning,
                      emit: Callable[[str], None] = print_warning) -> Iterator[None]:
    """Inside, warnings of `category` reach the user as `emit(message)` (default: one line
    `wpk: warning: ...` on stderr) instead of Python's two lines (file:line, then the source
    line); other warnings print as usual. CLI mains wrap their work in it. The hook is
    process-wide (threads included) and restored on exit; warning filters still apply."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, kind, filename, lineno, file=None, line=None):  # noqa: ANN001
            if issubclass(kind, category):
                emit(str(message))
            else:
                shown(message, kind, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name `name` is most likely a typo of (difflib), or None where none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return close[0] if close else None


def refuse_unknown_keys(keys: Iterable[object], known: Iterable[str], where: str,
                        what: str = "key", otherwise: str = "") -> None:
    """A hand-written file's first unknown key as one line, with the closest known one
    (`linkz` -> did you mean 'links'?), or `otherwise` where none is close."""
    known = sorted(known)
    for key in sorted({str(k) for k in keys} - set(known)):
        close = closest(key, known)
        hint = f" (did you mean {close!r}?)" if close else (f" ({otherwise})" if otherwise
                                                           else f" (known: {', '.join(known)})")
        raise WpkError(f"{where}: unknown {what} {key!r}{hint}")


def refuse_unknown_choice(value: str, choices: Iterable[str], what: str,
                          where: str = "") -> None:
    """`value` must be one of `choices` (in their order); otherwise one line naming them all,
    and the closest first where one is: "unknown format 'jsn' (did you mean 'json'? choose
    from json, raw, npy)"."""
    choices = list(choices)
    if value in choices:
        return
    close = closest(str(value), choices)
    hint = f"did you mean {close!r}? " if close else ""
    prefix = f"{where}: " if where else ""
    raise WpkError(f"{prefix}unknown {what} {value!r} ({hint}choose from {', '.join(choices)})")
