"""How the admin shows rows: aligned tables for people, JSON with stable keys for scripts.

What it prints came from outside (provider error text, routing keys, headers, payloads), so
nothing reaches the terminal raw: control characters (C0, DEL, C1 such as the 8-bit CSI) and
the bidirectional overrides that reorder what a line seems to say are printed escaped
(``\x1b``, ``\u202e``), in tables, in ``show`` and in the JSON output alike.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from worker.admin.queries import Stats

# The keys of one dead letter in `list --json` (and `show --json`), always all of them, in
# this order; absent values are null, timestamps RFC 3339 in UTC.
LIST_KEYS = (
    "id",
    "dead_at",
    "reason",
    "idempotency_key",
    "ticker",
    "channel",
    "audience",
    "attempts",
    "replay_count",
    "replayed_at",
    "first_seen_at",
    "content_type",
    "routing_key",
    "last_error",
    "failure_group",
    "fingerprint",
)
DELIVERY_KEYS = (
    "status",
    "attempts",
    "first_seen_at",
    "sent_at",
    "provider_status",
    "provider_message_id",
    "last_error",
    "updated_at",
)
ERROR_WIDTH = 60
_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
# in one-line cells: every control character; in blocks (show's JSON): all but the newline
_UNSAFE_IN_LINE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}]")
_UNSAFE_IN_BLOCK = re.compile(f"[\x00-\x09\x0b-\x1f\x7f-\x9f{_BIDI}]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    """``value`` as one line safe for a terminal: control characters escaped."""
    return _UNSAFE_IN_LINE.sub(_escape, str(value))


def printable_block(text: str) -> str:
    """Lines safe for a terminal: control characters but the newline escaped."""
    return _UNSAFE_IN_BLOCK.sub(_escape, text)


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def timestamp(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def short_time(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _jsonable(value: object) -> object:
    return timestamp(value) if isinstance(value, datetime) else value


def record(row: Any, keys: Sequence[str]) -> dict[str, object]:
    mapping = row._mapping
    return {key: _jsonable(mapping[key]) for key in keys}


def to_json(value: object) -> str:
    # json escapes C0 already; C1 and bidi characters become \\u escapes (valid in strings,
    # the only place they can be)
    return _UNSAFE_IN_BLOCK.sub(_json_escape, json.dumps(value, indent=2, ensure_ascii=False))


def truncate(text: str | None, width: int) -> str:
    if not text:
        return "-"
    flat = printable(" ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int]) -> str:
    """Columns padded to their widest cell; ``right`` holds the numeric columns' indexes."""
    cells = [[str(h) for h in headers], *[[printable(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def subject(row: Any) -> str:
    """``AAPL/email/premium``; ``-`` for an invalid body, which has none."""
    parts = (row.ticker, row.channel, row.audience)
    return "-" if all(p is None for p in parts) else "/".join(p or "?" for p in parts)


def dead_letter_table(rows: Sequence[Any]) -> str:
    headers = ("ID", "DEAD_AT", "REASON", "TICKER/CHANNEL/AUDIENCE", "ATTEMPTS", "REPLAYS")
    body = [
        (
            row.id,
            short_time(row.dead_at),
            row.reason,
            subject(row),
            row.attempts,
            row.replay_count,
            truncate(row.last_error, ERROR_WIDTH),
        )
        for row in rows
    ]
    return table((*headers, "LAST_ERROR"), body, right={0, 4, 5})


def payload_views(payload: bytes) -> tuple[object | None, str]:
    """The payload as a JSON value when it is UTF-8 JSON (else None), and as text to show:
    pretty JSON, or the bytes escaped and in hex."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        problem = "not UTF-8"
    else:
        try:
            value = json.loads(text)
        except ValueError:
            problem = "UTF-8 but not JSON"
        else:
            return value, to_json(value)
    return None, printable_block(f"{problem}; escaped: {payload!r}\nhex: {payload.hex(' ')}")


def show_json(row: Any, delivery: Any | None) -> dict[str, object]:
    data = record(row, LIST_KEYS)
    payload = bytes(row.payload)
    value, _ = payload_views(payload)
    data["headers"] = row.headers
    data["payload_json"] = value
    data["payload_base64"] = base64.b64encode(payload).decode("ascii")
    data["delivery"] = None if delivery is None else record(delivery, DELIVERY_KEYS)
    return data


def show_text(row: Any, delivery: Any | None) -> str:
    payload = bytes(row.payload)
    _, shown = payload_views(payload)
    fields: list[tuple[str, object]] = [
        ("reason", row.reason),
        ("idempotency_key", row.idempotency_key or "- (invalid body: no key)"),
        ("ticker/channel/audience", subject(row)),
        ("attempts", row.attempts),
        ("last_error", row.last_error or "-"),
        ("failure_group", f"{row.fingerprint}  {row.failure_group or '-'}"),
        ("first_seen_at", timestamp(row.first_seen_at)),
        ("dead_at", timestamp(row.dead_at)),
        ("replayed_at", timestamp(row.replayed_at) or "never"),
        ("replay_count", row.replay_count),
        ("content_type", row.content_type or "-"),
        ("routing_key", row.routing_key or "-"),
    ]
    lines = [f"dead letter {row.id}"]
    if getattr(row, "sanitised", None):
        fields.append(("sanitised", f"{row.sanitised} (made storable; payload exact)"))
    lines += [f"  {name:<24}{printable(value)}" for name, value in fields]
    if row.idempotency_key is None:
        lines.append("delivery: none (an invalid body has no idempotency key)")
    elif delivery is None:
        lines.append("delivery: no deliveries row for this key")
    else:
        lines.append("delivery (current status of its key)")
        for key in DELIVERY_KEYS:
            value = _jsonable(getattr(delivery, key))
            lines.append(f"  {key:<24}{'-' if value is None else printable(value)}")
    lines.append("headers")
    lines.append(_indent(to_json(row.headers)))
    lines.append(f"payload ({len(payload)} bytes)")
    lines.append(_indent(shown))
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def _counts(row: Any) -> dict[str, object]:
    return {
        "count": int(row.total),
        "replayed": int(row.replayed),
        "oldest_dead_at": timestamp(row.oldest),
        "newest_dead_at": timestamp(row.newest),
    }


def stats_json(stats: Stats) -> dict[str, object]:
    return {
        "total": stats.total,
        "replayed": stats.replayed,
        "not_replayed": stats.total - stats.replayed,
        "by_reason": [{"reason": r.reason, **_counts(r)} for r in stats.by_reason],
        "by_failure_group": [
            {
                "fingerprint": r.fingerprint,
                "failure_group": r.failure_group,
                "reasons": list(r.reasons),
                **_counts(r),
            }
            for r in stats.by_group
        ],
        "by_channel_audience": [
            {"channel": r.channel, "audience": r.audience, **_counts(r)}
            for r in stats.by_channel_audience
        ],
    }


_COUNT_HEADERS = ("COUNT", "REPLAYED", "OLDEST_DEAD_AT", "NEWEST_DEAD_AT")


def _count_cells(row: Any) -> tuple[object, ...]:
    return (row.total, row.replayed, short_time(row.oldest), short_time(row.newest))


def stats_text(stats: Stats) -> str:
    """Three tables: by reason, by failure group (fingerprint first, for ``--group``), and by
    channel and audience; each with counts and the oldest and newest dead_at."""
    if stats.total == 0:
        return "0 dead letters"
    by_reason = table(
        ("REASON", *_COUNT_HEADERS),
        [(r.reason, *_count_cells(r)) for r in stats.by_reason],
        right={1, 2},
    )
    by_group = table(
        ("GROUP", *_COUNT_HEADERS, "REASONS", "FAILURE"),
        [
            (
                r.fingerprint,
                *_count_cells(r),
                ",".join(r.reasons),
                truncate(r.failure_group, ERROR_WIDTH),
            )
            for r in stats.by_group
        ],
        right={1, 2},
    )
    by_target = table(
        ("CHANNEL", "AUDIENCE", *_COUNT_HEADERS),
        [
            (r.channel or "-", r.audience or "-", *_count_cells(r))
            for r in stats.by_channel_audience
        ],
        right={2, 3},
    )
    replayed = stats.replayed
    return (
        f"{stats.total} dead letters: {replayed} replayed, {stats.total - replayed} not\n\n"
        f"{by_reason}\n\n{by_group}\n\n{by_target}\n\n"
        "replay one failure group: worker-admin replay --group GROUP --dry-run"
    )
