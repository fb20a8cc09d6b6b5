"""The JSON Schemas shipped in wpk/schemas/ and one-line messages for what they reject."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from wpk.errors import WpkError

SCHEMA_DIR = Path(__file__).parent / "schemas"


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """`name` is the file's stem: "plan" reads wpk/schemas/plan.schema.json."""
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


def field_path(error: jsonschema.ValidationError) -> str:
    """Where a fault is, as a reader would write it: tiers[0].slice_inputs."""
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "top level"


def _message(error: jsonschema.ValidationError) -> str:
    message = error.message
    if error.validator == "required":
        message = message.replace(" is a required property", " is missing")
    elif error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        unknown = sorted(key for key in error.instance if key not in known)
        message = f"unknown field {unknown[0]!r}" if unknown else message
    elif error.validator == "minimum" and len(message) > 120:
        message = f"{error.instance!r} is below {error.validator_value}"
    return message[:160]


def check(document: Any, schema: str, source: str) -> None:
    """Raise a one-line WpkError naming `source`, the field and the first fault found."""
    validator = jsonschema.Draft202012Validator(load_schema(schema))
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        error = min(errors, key=lambda e: len(e.absolute_path))
        raise WpkError(f"{source}: {field_path(error)}: {_message(error)}")
