"""Scenario 8: bad input reaches a real replica. Each body is dead-lettered `invalid` with its
raw bytes, and the replica carries on; a body over WORKER_MAX_BODY_BYTES is refused unparsed
(even one that would have been a valid message)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from .conftest import Fleet, Published, batch

pytestmark = [pytest.mark.integration, pytest.mark.faults]

LIMIT = 4096


def body(**fields: Any) -> bytes:
    """A valid message's JSON with ``fields`` changed (None removes one)."""
    message = {
        "ticker": "BAD",
        "price": "10.5",
        "occurred_at": datetime.now(UTC).isoformat(),
        "channel": "email",
        "audience": "a",
    }
    message.update(fields)
    return json.dumps({k: v for k, v in message.items() if v is not None}).encode()


# (what, body, content type, a fragment of the recorded reason)
BAD = [
    ("1 MB body", body(padding="x" * 2**20), "application/json", "exceeds the limit"),
    ("just over the limit", body(padding="x" * LIMIT), "application/json", "exceeds the limit"),
    ("not UTF-8", b'{"ticker": "\xff\xfe"}', "application/json", "not UTF-8"),
    ("a JSON array", b"[1, 2, 3]", "application/json", "expected a JSON object"),
    ("fields missing", body(price=None, channel=None), "application/json", "price"),
    ("wrong content type", body(), "text/plain", "content type"),
    ("price NaN literal", body().replace(b'"10.5"', b"NaN"), "application/json", "not a number"),
    ("price 'NaN'", body(price="NaN"), "application/json", "price"),
    ("price -1", body(price=-1), "application/json", "greater than 0"),
    (
        "occurred_at a year ahead",
        body(occurred_at=(datetime.now(UTC) + timedelta(days=365)).isoformat()),
        "application/json",
        "future",
    ),
]


async def test_bad_input_is_dead_lettered_raw_and_the_worker_carries_on(fleet: Fleet) -> None:
    await fleet.start(1, WORKER_MAX_BODY_BYTES=str(LIMIT))
    bad = [Published(raw, content_type) for _, raw, content_type, _ in BAD]
    valid = batch(50, "OK")
    await fleet.publish([*batch(20, "PRE"), *bad, *valid])
    await fleet.wait_finished()

    rows = await fleet.rows(
        "SELECT payload, content_type, last_error FROM dead_letters WHERE reason = 'invalid'"
    )
    recorded = {bytes(row.payload): row for row in rows}
    assert len(rows) == len(BAD)  # each once
    for what, raw, content_type, reason in BAD:
        assert raw in recorded, f"{what}: no dead letter with its raw bytes"
        assert recorded[raw].content_type == content_type, what
        assert reason in recorded[raw].last_error, f"{what}: {recorded[raw].last_error}"
    fleet.replicas[0].check_alive()
    figures = await fleet.verify()
    assert figures.statuses["sent"] == 70  # before and after the bad input
    fleet.report(figures, bad_bodies=len(BAD), dead_lettered_invalid=len(rows))
