"""``worker-admin replay`` at scale, as the operator runs it: a real process interrupted by
SIGINT or SIGTERM or killed by SIGKILL and then run again, and a big replay that live alerts
overtake.

The dead letters are written with the worker's own statement (``DeliveryStore.dead_letter``),
as a replica that gave up on them would, so that thousands are ready in a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker.envelope import ATTEMPT, FIRST_SEEN_AT, LAST_ERROR
from worker.message import parse_message
from worker.persistence import DeliveryStore, RawMessage, create_engine

from .conftest import AMQP_URL, Harness, price_change
from .test_admin import (
    Admin,
    admin_for,
    drain_work_queue,
    replayed_from,
    wait_sent,
    work_queue_depth,
)
from .test_outcomes import key_of

ERROR = 'HTTP 500: {"error": "injected failure 500"}'


@pytest.fixture
def admin(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Admin:
    return admin_for(harness, monkeypatch)


@pytest.fixture
async def store(harness: Harness) -> AsyncIterator[DeliveryStore]:
    engine = create_engine(
        harness.database_url.replace("postgresql://", "postgresql+asyncpg://"), 8
    )
    yield DeliveryStore(engine, lease_seconds=25)
    await engine.dispose()


async def dead_letters(store: DeliveryStore, count: int, audience: str) -> list[str]:
    """``count`` messages to ``audience`` dead after their second attempt got a 500, written as
    the worker writes them; their keys."""
    now = datetime.now(UTC)
    keys: list[str] = []
    for start in range(0, count, 100):
        writes = []
        for i in range(start, min(start + 100, count)):
            body = json.dumps(price_change(ticker=f"T{i}", audience=audience)).encode()
            message = parse_message(body, now)
            headers = {ATTEMPT: 1, FIRST_SEEN_AT: now.isoformat(), LAST_ERROR: ERROR}
            raw = RawMessage(body, "application/json", "prices.test", headers, now)
            keys.append(message.idempotency_key)
            writes.append(store.dead_letter("exhausted", raw, message, ERROR, 2, None, 500))
        await asyncio.gather(*writes)
    return keys


async def replayed_count(harness: Harness) -> int:
    rows = await harness.rows(
        "SELECT count(*) AS n FROM dead_letters WHERE replayed_at IS NOT NULL"
    )
    return int(rows[0].n)


async def start_admin(harness: Harness, *argv: str) -> asyncio.subprocess.Process:
    """The real ``worker-admin`` console script, in a process of its own."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WORKER_")}
    env.update(
        WORKER_DATABASE_URL=harness.database_url,
        WORKER_AMQP_URL=AMQP_URL,
        WORKER_QUEUE=harness.names.queue,
    )
    return await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "worker-admin"),
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def signal_once_replaying(
    harness: Harness, process: asyncio.subprocess.Process, signum: int, after: int
) -> tuple[int, str]:
    """Send ``signum`` once ``after`` rows are replayed; the exit status and stderr."""

    async def replaying() -> bool:
        if process.returncode is not None:
            assert process.stderr is not None
            raise AssertionError(f"worker-admin ended early: {await process.stderr.read()!r}")
        return await replayed_count(harness) >= after

    await harness.wait_for(replaying, timeout=30, what=f"{after} rows replayed")
    process.send_signal(signum)
    _, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_finishes_the_batch_and_a_rerun_replays_the_rest_once(
    harness: Harness, admin: Admin, store: DeliveryStore, signum: signal.Signals
) -> None:
    await dead_letters(store, 3000, "sigint")
    await harness.start()  # declares the work queue
    await harness.stop()
    rows = await harness.rows("SELECT id FROM dead_letters ORDER BY id")
    dry = (await admin("replay", "--all", "--dry-run")).out.splitlines()
    assert len(dry) == 1 + 50 + 2  # the header, the first 50 rows, the count and the summary
    assert dry[-2:] == [
        "(the first 50 of 3000, oldest first)",
        "would replay 3000, would skip 0; dry run: nothing published, nothing changed",
    ]
    process = await start_admin(harness, "replay", "--all", "--rate", "1000")  # 3 s, 100 a batch

    code, err = await signal_once_replaying(harness, process, signum, after=300)

    replayed = await replayed_count(harness)
    assert 300 <= replayed < 3000
    assert code == 1
    assert err == (
        f"worker-admin: interrupted: replayed {replayed}, every other row untouched;"
        " run the same command again to replay the rest\n"
    )
    first = replayed_from(await drain_work_queue(harness))
    assert first == Counter({row.id: 1 for row in rows[:replayed]})  # nothing half done

    rest = await admin("replay", "--all")
    assert rest.out.strip() == f"replayed {3000 - replayed}, skipped 0"
    second = replayed_from(await drain_work_queue(harness))
    assert first + second == Counter({row.id: 1 for row in rows})


async def test_a_killed_replay_resumes_and_the_provider_gets_each_key_once(
    harness: Harness, admin: Admin, store: DeliveryStore
) -> None:
    keys = await dead_letters(store, 1000, "killed")
    await harness.start(concurrency=16)
    process = await start_admin(harness, "replay", "--all", "--batch", "50")

    code, _ = await signal_once_replaying(harness, process, signal.SIGKILL, after=100)

    assert code == -signal.SIGKILL
    left = 1000 - await replayed_count(harness)
    rest = await admin("replay", "--all", "--batch", "50")
    assert rest.out.strip() == f"replayed {left}, skipped 0"
    await wait_sent(harness, keys, timeout=60)
    await harness.wait_for(lambda: _drained(harness), what="the work queue drained")
    await harness.stop()  # every message taken has finished
    # The killed batch may have been published twice; the worker sends each key once.
    assert Counter(r.key for r in harness.provider.requests) == Counter(keys)
    assert {r.status for r in harness.provider.requests} == {200}


async def _drained(harness: Harness) -> bool:
    return await work_queue_depth(harness) == 0


async def test_live_alerts_overtake_a_big_replay(
    harness: Harness, admin: Admin, store: DeliveryStore
) -> None:
    replay_keys = set(await dead_letters(store, 300, "replayed"))
    harness.provider.latency_ms = 20  # a slow provider: the replay takes 6 s at concurrency 1
    await harness.start(concurrency=1)
    result = await admin("replay", "--all")
    assert result.out.strip() == "replayed 300, skipped 0", result.err
    await harness.wait_for_requests(20, "the replay under way")

    before = len(harness.provider.requests)
    live = [price_change(ticker=f"LIVE{i}", audience="live") for i in range(10)]
    for body in live:
        await harness.publish(body)
    live_keys = [key_of(body) for body in live]
    await wait_sent(harness, live_keys)

    order = [r.key for r in harness.provider.requests]
    last_live = max(order.index(key) for key in live_keys)
    replayed_between = [k for k in order[before : last_live + 1] if k in replay_keys]
    # At concurrency 1 (prefetch 1) at most the replayed message in flight and the one
    # already delivered go before the live ones; the rest of the replay waits behind them.
    assert len(replayed_between) <= 2, replayed_between
    assert await work_queue_depth(harness) > 100  # most of the replay was still waiting
