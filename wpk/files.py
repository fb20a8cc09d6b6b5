"""Reading and writing the user's files: every way a path can be wrong is one line naming
the file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from wpk.errors import WpkError


def existing_file(path: str | os.PathLike, kind: str = "") -> Path:
    """`path` as a Path if it names a file; `kind` ('profile', 'tiers') names it in errors."""
    path = Path(path)
    label = f"{kind} file" if kind else "file"
    if not path.exists():
        raise WpkError(f"{path}: no such {label}")
    if path.is_dir():
        raise WpkError(f"{path}: is a directory, not a {label}")
    return path


def read_text(path: str | os.PathLike, kind: str = "") -> str:
    """The UTF-8 text of a file the user named."""
    path = existing_file(path, kind)
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise WpkError(f"{path}: not a {kind or 'text'} file (not UTF-8 text)") from None
    except OSError as error:
        raise WpkError(f"{path}: cannot read it ({error.strerror})") from None


def writable_file(path: str | os.PathLike, kind: str = "") -> Path:
    """`path` as a Path if a file can be written there (checked before a long run, so that
    its results are not lost at the end): not a directory; its folder is created if missing
    (as `-o` folders are: `--report out/model.png` on a fresh checkout)."""
    path = Path(path)
    label = f"{kind} file" if kind else "output file"
    if path.is_dir():
        raise WpkError(f"{path}: is a directory, not a {label}")
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a file where a folder should be, or no permission
            raise WpkError(f"{path}: cannot write the {label}: {path.parent} is not a "
                           f"directory and cannot be made one") from None
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise WpkError(f"{path}: cannot write the {label} (permission denied)")
    return path


def read_yaml(path: str | os.PathLike, kind: str = ""):
    """The YAML document of a file the user named; malformed YAML is one line with its line
    number, not the parser's multi-line dump."""
    import yaml

    text = read_text(path, kind)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise WpkError(f"{Path(path)}: malformed YAML{where}") from None


def check_outputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike],
                  *, force: bool) -> None:
    """The rule for every command that writes files, checked before any work starts: an
    output is never one of the command's own inputs (not even with --force: the input would
    be gone), and a file already there is an earlier result, replaced only with --force."""
    existing_inputs = [Path(p) for p in inputs if p is not None and Path(p).is_file()]
    for output in map(Path, outputs):
        if not output.exists():
            continue
        if output.is_dir():
            raise WpkError(f"{output}: cannot write it: a directory has that name")
        if any(os.path.samefile(output, source) for source in existing_inputs):
            raise WpkError(f"{output}: is an input of this command; writing there would "
                           f"destroy it: choose another output")
        if not force:
            raise WpkError(f"{output}: exists (an earlier result); pass --force to replace "
                           f"it, or choose another output")


def read_json(path: str | os.PathLike, kind: str = "") -> Any:
    """The parsed JSON of a file; a missing, unreadable or malformed one is a one-line
    WpkError naming the file."""
    text = read_text(path, kind)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise WpkError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None


def write_json_rows(document: Mapping[str, Any], rows_key: str, path: str | os.PathLike
                    ) -> Path:
    """`document` as indented JSON with one line per item of its list `rows_key` (profile
    nodes, latency-table entries: diffable, and readable by eye)."""
    path = Path(path)
    head = {k: v for k, v in document.items() if k != rows_key}
    lines = [json.dumps(head, indent=1)[:-2] + f',\n "{rows_key}": [',
             ",\n".join("  " + json.dumps(row) for row in document[rows_key]),
             " ]\n}\n"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines))
    except OSError as error:
        raise WpkError(f"{path}: cannot write ({error.strerror})") from None
    return path
