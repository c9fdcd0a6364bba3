"""Failure groups and fingerprints: how ``stats`` groups dead letters, how ``--group`` picks.

A dead letter's failure group is its ``last_error`` normalised by
:data:`worker.schema.FAILURE_GROUP_RULES`; PostgreSQL computes it once per row into the
generated column ``dead_letters.failure_group``. :func:`failure_group` is the same function in
Python (the tests hold the two to agreement). A group's *fingerprint* is the first 12 hex digits
of the MD5 of its text: short enough to type, stable across runs and machines, and the same in
SQL (:data:`FINGERPRINT`, for selecting) and in Python (:func:`fingerprint`, for showing).
"""

from __future__ import annotations

import hashlib
import re

from sqlalchemy import ColumnElement, func

from worker.schema import (
    FAILURE_GROUP_CHARS,
    FAILURE_GROUP_INPUT_CHARS,
    FAILURE_GROUP_RULES,
    dead_letters,
)

FINGERPRINT_LENGTH = 12
FINGERPRINT_PATTERN = re.compile(f"[0-9a-f]{{{FINGERPRINT_LENGTH}}}")
_RULES = tuple((re.compile(pattern), replacement) for pattern, replacement in FAILURE_GROUP_RULES)

# A row's fingerprint in SQL; the generated column makes it one md5 per row, no regex.
FINGERPRINT: ColumnElement[str] = func.left(
    func.md5(dead_letters.c.failure_group), FINGERPRINT_LENGTH
)


def failure_group(last_error: str | None) -> str:
    """The failure group of ``last_error``, as the generated column computes it."""
    text = (last_error or "")[:FAILURE_GROUP_INPUT_CHARS]
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text.strip(" ")[:FAILURE_GROUP_CHARS]


def fingerprint(group: str) -> str:
    """The short id of a failure group, as :data:`FINGERPRINT` computes it."""
    digest = hashlib.md5(group.encode("utf-8"), usedforsecurity=False).hexdigest()
    return digest[:FINGERPRINT_LENGTH]
