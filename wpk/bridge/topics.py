"""MQTT topic filters and result-topic templates (`plant/{1}/inference`)."""
from __future__ import annotations

import re
import string

from wpk.errors import WpkError


def check_filter(topic_filter: str) -> None:
    """Raise WpkError unless `topic_filter` is a valid MQTT subscription filter."""
    levels = topic_filter.split("/")
    if not topic_filter or "\0" in topic_filter:
        raise WpkError(f"subscription {topic_filter!r}: empty topic filter")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            raise WpkError(f"subscription {topic_filter!r}: wildcard must fill a whole level")
        if level == "#" and i != len(levels) - 1:
            raise WpkError(f"subscription {topic_filter!r}: '#' must be the last level")


def matches(topic_filter: str, topic: str) -> bool:
    """True if `topic` matches the MQTT filter (`+` one level, `#` the rest)."""
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return not (i == 0 and topic.startswith("$"))
        if i >= len(topic_levels):
            return False
        if level == "+":
            if i == 0 and topic.startswith("$"):
                return False
        elif level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)


class TopicTemplate:
    """`plant/{1}/inference`: `{k}` is level k (from 0) of the topic the input came on.

    `{topic}` is the whole source topic. Literal braces are written `{{` and `}}`.
    """

    def __init__(self, template: str):
        self.template = template
        self.levels: list[int] = []
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template)]
        except ValueError as error:  # an unmatched brace
            raise WpkError(f"publish template {template!r}: {error} (write a literal brace "
                           "as {{ or }})") from None
        for field in fields:
            if field is None:
                continue
            if field == "topic":
                continue
            if not re.fullmatch(r"\d+", field):
                raise WpkError(f"publish template {template!r}: unknown field {{{field}}}; "
                               "use {0}, {1}, ... (topic levels) or {topic}")
            self.levels.append(int(field))
        if "+" in template or "#" in template:
            raise WpkError(f"publish template {template!r}: wildcards are not allowed")

    def render(self, topic: str) -> str:
        levels = topic.split("/")
        if self.levels and max(self.levels) >= len(levels):
            raise ValueError(f"publish template {self.template!r} needs level "
                             f"{max(self.levels)} but topic {topic!r} has {len(levels)} levels")
        return self.template.format(*levels, topic=topic)

    def check_against(self, topic_filter: str) -> None:
        """Reject templates that read a level the filter cannot guarantee."""
        filter_levels = topic_filter.split("/")
        if "#" in filter_levels:
            return
        if self.levels and max(self.levels) >= len(filter_levels):
            raise WpkError(f"publish template {self.template!r} reads level {max(self.levels)} "
                           f"but {topic_filter!r} has only {len(filter_levels)} levels")
