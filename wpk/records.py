"""Dict-style reads on dataclasses that replaced JSON dicts.

`Plan.model`, `Plan.objective` and the tensor specs were plain dicts until plan format
version 1 got types; code written against the dicts (`plan.model["inputs"][0]["name"]`) keeps
working through this read-only view of the record's JSON form. New code uses attributes.
"""
from __future__ import annotations

from typing import Any, Iterator


class JsonRecord:
    """Mixin: `record[key]`, `record.get(key)`, `key in record`, `keys()` on `to_json()`."""

    def to_json(self) -> dict[str, Any]:  # pragma: no cover - every record defines it
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()

    def keys(self) -> Iterator[str]:
        return iter(self.to_json())
