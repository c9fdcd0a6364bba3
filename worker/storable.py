"""Sanitise at the edges: what goes into PostgreSQL's text and jsonb columns made storable.

PostgreSQL refuses U+0000 in ``text`` (22021) and in ``jsonb`` (22P05), a lone surrogate
(``"\\ud800"``) cannot be encoded as UTF-8 at all (asyncpg: 22000), ``NaN`` and ``Infinity`` are
not JSON (22P02), and an int beyond 64 bits is beyond what every reader of the column handles.
Headers (any AMQP field table: byte arrays, floats, decimals, timestamps, nested tables), the
provider's error text and ids, and the routing key come from outside, so each is made storable
here: NUL and surrogates replaced by U+FFFD, bytes decoded as UTF-8 with replacement, numbers that
JSON cannot carry written as text, strings, containers and nesting bounded. The truth is kept
elsewhere: a dead letter keeps the body's exact bytes in ``payload`` (bytea), and records in
``sanitised`` which of its columns were changed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
MAX_TEXT_CHARS = 1000  # a stored error text or header string
MAX_ID_CHARS = 200  # a provider message id
MAX_DEPTH = 16
MAX_ITEMS = 100  # per table or array
MAX_HEADERS_CHARS = 16384  # every string of a header table together
_INT64 = 2**63


def has_unstorable(value: str) -> bool:
    """Does ``value`` hold a NUL or a surrogate code point?"""
    return _UNSTORABLE.search(value) is not None


def storable_text(value: str, limit: int = MAX_TEXT_CHARS) -> tuple[str, bool]:
    """``value`` without NUL or surrogates, at most ``limit`` characters; True if changed."""
    cleaned = _UNSTORABLE.sub(REPLACEMENT, value)
    if len(cleaned) > limit:
        cleaned = cleaned[: max(limit - 1, 0)] + "…"
    return cleaned, cleaned != value


def clean_text(value: str, limit: int = MAX_TEXT_CHARS) -> str:
    return storable_text(value, limit)[0]


def decode_text(value: bytes, limit: int = MAX_TEXT_CHARS) -> tuple[str, bool]:
    """Bytes as storable text: UTF-8, undecodable bytes replaced; True if anything was."""
    text = value[: limit * 4].decode("utf-8", errors="replace")
    cleaned, changed = storable_text(text, limit)
    return cleaned, changed or REPLACEMENT in text or len(value) > limit * 4


class _Budget:
    def __init__(self, chars: int) -> None:
        self.chars = chars
        self.changed = False

    def text(self, value: str) -> str:
        cleaned, changed = storable_text(value, min(MAX_TEXT_CHARS, max(self.chars, 0)))
        self.chars -= len(cleaned)
        self.changed |= changed
        return cleaned


def storable_json(value: Any, max_chars: int = MAX_HEADERS_CHARS) -> tuple[Any, bool]:
    """``value`` (an AMQP header table, say) as JSON that jsonb accepts; True if changed."""
    budget = _Budget(max_chars)
    result = _storable(value, budget, 0)
    return result, budget.changed


def _storable(value: Any, budget: _Budget, depth: int) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -_INT64 <= value < _INT64:
            return value
        budget.changed = True
        return budget.text(str(value)) if value.bit_length() < 4000 else "<huge integer>"
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        budget.changed = True
        return str(value)
    if isinstance(value, Decimal):
        return budget.text(str(value))  # as before: decimals are stored as their text
    if isinstance(value, str):
        return budget.text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        text, changed = decode_text(bytes(value))
        budget.changed |= changed
        return budget.text(text)
    if isinstance(value, (datetime, date, time)):
        return budget.text(value.isoformat())
    if isinstance(value, (Mapping, list, tuple)):
        if depth >= MAX_DEPTH or budget.chars <= 0:
            budget.changed = True
            return None
        if isinstance(value, Mapping):
            items = list(value.items())
            if len(items) > MAX_ITEMS:
                budget.changed = True
            out: dict[str, Any] = {}
            for key, item in items[:MAX_ITEMS]:
                name = budget.text(key if isinstance(key, str) else str(key))
                out[name] = _storable(item, budget, depth + 1)
            return out
        if len(value) > MAX_ITEMS:
            budget.changed = True
        return [_storable(item, budget, depth + 1) for item in value[:MAX_ITEMS]]
    budget.changed = True
    return budget.text(repr(value)[:MAX_TEXT_CHARS])


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: object) -> str:
    """Compact JSON for a jsonb column: decimals exact, as text."""
    # allow_nan=False: NaN is not JSON and jsonb refuses it; such a value is a data error
    return json.dumps(value, default=_json_default, separators=(",", ":"), allow_nan=False)
