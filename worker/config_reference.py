"""The configuration reference (``docs/configuration.md``), generated from the settings model.

Every field of :class:`worker.settings.Settings` becomes one row: its environment variable, type,
default, constraints and description. ``python -m worker.config_reference --write`` regenerates
the file; ``tests/unit/test_config_reference.py`` fails when the file and the model drift apart.
"""

from __future__ import annotations

import argparse
import sys
from enum import Enum
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, get_args

import annotated_types
from pydantic import HttpUrl
from pydantic.fields import FieldInfo

from worker.settings import ENV_PREFIX, Settings

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REGENERATE = "python -m worker.config_reference --write"

_HEADER = f"""\
# Configuration reference

<!-- Generated from worker/settings.py by `{REGENERATE}`.
     Edit the model, not this file. -->

The worker reads its configuration from environment variables with the prefix `{ENV_PREFIX}`
(SPEC §4), once, at start. A missing or invalid value stops the process with exit status 2 and
one line naming the variable, e.g. `worker: configuration error: WORKER_CONCURRENCY: Input
should be greater than or equal to 1 (got '0')`. Unknown `{ENV_PREFIX}*` variables are ignored.
The `started` log event lists every setting, with the passwords in URLs masked.

TLS, connection limits and cluster notes for these URLs: [deploy.md](deploy.md).

| variable | type | default | allowed | description |
|---|---|---|---|---|
"""

_TYPE_NAMES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    frozenset[int]: "statuses and ranges",
    tuple[str, ...]: "comma-separated names",
    HttpUrl: "http(s) URL",
}


def _code(text: str) -> str:
    """``text`` as an inline code span that is safe inside a Markdown table cell."""
    return "`" + text.replace("|", "\\|") + "`"


def _status_ranges(statuses: frozenset[int]) -> str:
    """The inverse of :func:`worker.settings.parse_status_ranges`: ``408,425,500-599``."""
    runs: list[list[int]] = []
    for status in sorted(statuses):
        if runs and status == runs[-1][1] + 1:
            runs[-1][1] = status
        else:
            runs.append([status, status])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)


def _type(field: FieldInfo) -> str:
    annotation = field.annotation
    if isinstance(annotation, UnionType):  # `X | None`: the default says it may be unset
        (annotation,) = (arg for arg in get_args(annotation) if arg is not NoneType)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(_code(str(member.value)) for member in annotation)
    if annotation not in _TYPE_NAMES:
        raise TypeError(f"no name for the type {annotation!r}: add it to _TYPE_NAMES")
    return _TYPE_NAMES[annotation]


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is None:
        return "none"
    if isinstance(value, Enum):
        value = value.value
    elif isinstance(value, frozenset):
        value = _status_ranges(value)
    elif isinstance(value, tuple):
        value = ",".join(value)
    return _code(str(value))


_BOUNDS = (
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "≤"),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.MinLen, "min_length", "length ≥"),
    (annotated_types.MaxLen, "max_length", "length ≤"),
)


def _constraints(field: FieldInfo) -> str:
    parts: list[str] = []
    for item in field.metadata:
        for kind, attribute, sign in _BOUNDS:
            if isinstance(item, kind):
                parts.append(f"{sign} {getattr(item, attribute)}")
        pattern = getattr(item, "pattern", None)
        if isinstance(pattern, str):
            parts.append("matches " + _code(pattern))
    return ", ".join(parts)


def render() -> str:
    """The whole of ``docs/configuration.md``."""
    rows = [
        "| "
        + " | ".join(
            (
                _code(ENV_PREFIX + name.upper()),
                _type(field),
                _default(field),
                _constraints(field),
                field.description or "",
            )
        )
        + " |"
        for name, field in Settings.model_fields.items()
    ]
    return _HEADER + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH.name}")
    args = parser.parse_args(argv)
    if args.write:
        DOC_PATH.write_text(render(), encoding="utf-8")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
