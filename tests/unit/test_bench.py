"""The benchmarks' own arithmetic and their README table (no services needed)."""

from __future__ import annotations

import json
from typing import Any

from bench import report
from bench.lib import RESULTS, outcome, price_changes, published
from bench.scenarios import top_entries


def record(seq: int, key: str, occurred_at: str, status: int = 200) -> dict[str, Any]:
    return {
        "seq": seq, "key": key, "ticker": "T1", "channel": "email", "audience": "a",
        "occurred_at": occurred_at, "status": status, "at": float(seq),
    }  # fmt: skip


def test_the_readme_table_is_the_one_of_results_json() -> None:
    results = json.loads((RESULTS / "results.json").read_text())
    assert report.readme_section() == report.markdown(results)


def test_an_older_price_accepted_after_a_newer_one_is_a_stale_send() -> None:
    seen = outcome(
        [record(0, "k2", "2026-01-01T00:00:02Z"), record(1, "k1", "2026-01-01T00:00:01Z")]
    )
    assert seen.stale == 1
    assert seen.duplicates == 0


def test_a_409_is_a_duplicate_request_and_not_a_second_acceptance() -> None:
    seen = outcome(
        [record(0, "k1", "2026-01-01T00:00:01Z"), record(1, "k1", "2026-01-01T00:00:01Z", 409)]
    )
    assert seen.duplicates == 1
    assert seen.accepted_at == {"k1": 0.0}


def test_a_message_superseded_by_a_newer_accepted_price_is_not_lost() -> None:
    bodies = price_changes(16, tickers=1)  # two messages per group, the second newer
    messages = published(bodies, [float(n) for n in range(16)])
    newer = messages[8]  # email/a, the second of its topic
    records = [
        {"seq": 0, "key": newer.key, "ticker": "T0", "channel": "email", "audience": "a",
         "occurred_at": newer.occurred_at, "status": 200, "at": 9.0},
    ]  # fmt: skip
    seen = outcome(records)
    assert messages[0].topic == newer.topic
    assert seen.lost([messages[0], newer]) == 0
    assert seen.lost([messages[1]]) == 1  # email/b: never sent, nothing newer


def test_every_body_has_its_own_key_and_topics_repeat_only_when_asked() -> None:
    now = [0.0] * 64
    distinct = published(price_changes(64), now)
    repeated = published(price_changes(64, tickers=2), now)
    assert len({m.key for m in distinct}) == len({m.topic for m in distinct}) == 64
    assert len({m.key for m in repeated}) == 64
    assert len({m.topic for m in repeated}) == 16


def test_the_profile_summary_counts_own_and_inclusive_samples() -> None:
    text = top_entries(["proc;main;send 3", "proc;main;parse 1"], count=2)
    assert "75.0%  send" in text
    assert "100.0%  main" in text
