"""worker-admin prints what came from outside: nothing reaches the terminal raw."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

from worker.admin.render import dead_letter_table, printable, show_text, to_json

HOSTILE = "HTTP 500: \x1b[2J\x1b]0;pwned\x07 \x9b31m \u202eevil\u202c\r\nnext"
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _row(**changes: object) -> SimpleNamespace:
    row = SimpleNamespace(
        id=1,
        dead_at=NOW,
        reason="exhausted",
        idempotency_key="k" * 64,
        ticker="A",
        channel="email",
        audience="a",
        attempts=3,
        replay_count=0,
        replayed_at=None,
        first_seen_at=NOW,
        content_type="application/json",
        routing_key="prices.\x1b[31mred",
        last_error=HOSTILE,
        failure_group="HTTP 500",
        fingerprint="abc",
        headers={"x-last-error": HOSTILE},
        payload=b'{"text": "\\u001b[2J\xc2\x9b"}',
        sanitised="headers",
    )
    row.__dict__.update(changes)
    return row


def _no_raw_controls(text: str) -> None:
    for char in "\x1b\x07\x9b\u202e\r":
        assert char not in text, f"{char!r} printed raw"


def test_printable_escapes_control_and_bidi_characters() -> None:
    assert printable("a\x1bb\u202ec\n") == "a\\x1bb\\u202ec\\x0a"
    assert printable("plain €") == "plain €"


def test_tables_and_show_escape_what_came_from_outside() -> None:
    _no_raw_controls(dead_letter_table([_row()]))
    shown = show_text(_row(), None)
    _no_raw_controls(shown)
    assert "sanitised" in shown


def test_json_output_stays_json_and_escapes_c1_and_bidi() -> None:
    text = to_json({"error": HOSTILE})
    _no_raw_controls(text)
    assert json.loads(text) == {"error": HOSTILE}
