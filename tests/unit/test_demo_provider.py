"""The demo provider over real HTTP: idempotency, injected failures, drops, records, control API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from worker.tooling.demo_provider import DemoProvider, RequestRecord, Rule, main


@pytest.fixture
async def provider() -> AsyncIterator[DemoProvider]:
    async with DemoProvider() as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def notification(key: str, audience: str = "a") -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "ticker": "AAPL",
        "price": "189.1",
        "previous_price": "188",
        "occurred_at": "2026-11-27T10:00:00.000000Z",
        "audience": audience,
        "text": None,
    }


async def send(
    session: aiohttp.ClientSession,
    provider: DemoProvider,
    key: str,
    channel: str = "email",
    audience: str = "a",
) -> tuple[int, Any]:
    async with session.post(
        f"{provider.url}/v1/notifications/{channel}",
        json=notification(key, audience),
        headers={"Idempotency-Key": key},
    ) as response:
        return response.status, await response.json()


async def test_accepts_a_key_once_then_answers_409_with_the_same_id(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    status, body = await send(session, provider, "k1")
    assert status == 200
    assert await send(session, provider, "k1") == (409, {"id": body["id"]})
    assert provider.accepted == {"k1": body["id"]}
    assert [r.status for r in provider.requests] == [200, 409]


async def test_500_rule_hits_only_its_channel_and_audience(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    provider.set_rules([Rule(channel="email", audience="b", status=500)])
    assert (await send(session, provider, "k1", "email", "a"))[0] == 200
    assert (await send(session, provider, "k2", "sms", "b"))[0] == 200
    assert (await send(session, provider, "k3", "email", "b"))[0] == 500
    assert "k3" not in provider.accepted


async def test_403_rule_by_audience_covers_every_channel(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    provider.set_rules([Rule(audience="lapsed", status=403)])
    assert (await send(session, provider, "k1", "email", "lapsed"))[0] == 403
    assert (await send(session, provider, "k2", "sms", "lapsed"))[0] == 403
    assert (await send(session, provider, "k3", "sms", "a"))[0] == 200


async def test_429_carries_retry_after(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    provider.set_rules([Rule(status=429, retry_after=7)])
    async with session.post(
        f"{provider.url}/v1/notifications/sms",
        json=notification("k1"),
        headers={"Idempotency-Key": "k1"},
    ) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "7"


async def test_rule_with_times_is_exhausted_then_requests_succeed(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    provider.set_rules([Rule(status=503, times=2)])
    statuses = [(await send(session, provider, "k1"))[0] for _ in range(3)]
    assert statuses == [503, 503, 200]


async def test_drop_accepts_the_key_but_cuts_the_connection(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    provider.set_rules([Rule(drop=True, times=1)])
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await send(session, provider, "k1")
    message_id = provider.accepted["k1"]
    assert await send(session, provider, "k1") == (409, {"id": message_id})
    first, second = provider.requests
    assert (first.status, first.dropped) == (200, True)
    assert (second.status, second.dropped) == (409, False)


async def test_probability_is_reproducible_with_a_seed(session: aiohttp.ClientSession) -> None:
    runs = []
    for _ in range(2):
        async with DemoProvider([Rule(probability=0.5)], seed=42) as provider:
            runs.append([(await send(session, provider, f"k{n}"))[0] for n in range(20)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 500}


async def test_records_keep_arrival_order(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    provider.set_rules([Rule(audience="b", status=500)])
    sent = [("new", "a"), ("old", "b"), ("newer", "a"), ("old", "b")]
    for key, audience in sent:
        await send(session, provider, key, audience=audience)
    records = provider.requests
    assert [(r.key, r.audience, r.status) for r in records] == [
        ("new", "a", 200),
        ("old", "b", 500),
        ("newer", "a", 200),
        ("old", "b", 500),
    ]
    assert [r.seq for r in records] == [0, 1, 2, 3]
    assert [r.at for r in records] == sorted(r.at for r in records)


async def test_latency_delays_the_answer(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    provider.latency_ms = 100
    started = time.monotonic()
    assert (await send(session, provider, "k1"))[0] == 200
    assert time.monotonic() - started >= 0.1


async def test_on_request_runs_before_the_answer_is_written(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    seen: list[tuple[str, int, int]] = []

    async def hook(record: RequestRecord) -> None:
        # the decision is made and recorded, the client still waits for its answer
        seen.append((record.key, record.status, len(provider.requests)))
        await asyncio.sleep(0.1)

    provider.on_request = hook
    started = time.monotonic()
    assert (await send(session, provider, "k1"))[0] == 200
    assert time.monotonic() - started >= 0.1
    assert (await send(session, provider, "k1"))[0] == 409
    assert seen == [("k1", 200, 1), ("k1", 409, 2)]


@pytest.mark.parametrize(
    ("path", "headers", "data", "status"),
    [
        ("/v1/notifications/fax", {"Idempotency-Key": "k1"}, '{"idempotency_key": "k1"}', 404),
        ("/v1/notifications/email", {}, None, 400),
        ("/v1/notifications/email", {"Idempotency-Key": "k1"}, "not json", 400),
        ("/v1/notifications/email", {"Idempotency-Key": "k1"}, '{"ticker": "AAPL"}', 400),
        ("/v1/notifications/email", {"Idempotency-Key": "other"}, None, 400),
    ],
)
async def test_malformed_requests_are_rejected_and_not_recorded(
    provider: DemoProvider,
    session: aiohttp.ClientSession,
    path: str,
    headers: dict[str, str],
    data: str | None,
    status: int,
) -> None:
    body = data if data is not None else aiohttp.JsonPayload(notification("k1"))
    async with session.post(provider.url + path, data=body, headers=headers) as response:
        assert response.status == status
    assert provider.requests == []
    assert provider.accepted == {}


async def test_control_api_round_trip(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    rules = {"rules": [{"channel": "sms", "status": 500}], "latency_ms": 5}
    async with session.put(f"{provider.url}/_control/rules", json=rules) as response:
        assert response.status == 200
    assert provider.latency_ms == 5
    await send(session, provider, "k1", "sms")
    await send(session, provider, "k2", "email")

    async with session.get(f"{provider.url}/_control/requests") as response:
        records = await response.json()
    assert [(r["key"], r["channel"], r["status"], r["seq"]) for r in records] == [
        ("k1", "sms", 500, 0),
        ("k2", "email", 200, 1),
    ]
    async with session.get(f"{provider.url}/_control/accepted") as response:
        assert await response.json() == provider.accepted == {"k2": provider.accepted["k2"]}

    async with session.delete(f"{provider.url}/_control/state") as response:
        assert response.status == 200
    assert (provider.requests, provider.accepted) == ([], {})
    assert (await send(session, provider, "k1", "sms"))[0] == 200


async def test_control_api_rejects_a_bad_rule(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    bad = {"rules": [{"channel": "sms", "colour": "red"}]}
    async with session.put(f"{provider.url}/_control/rules", json=bad) as response:
        assert response.status == 400


def test_rule_round_trips_through_a_dict() -> None:
    rule = Rule(channel="email", status=429, retry_after=3, times=2, probability=0.5)
    assert Rule.from_dict(rule.to_dict()) == rule
    assert Rule.from_dict({"audience": "b", "drop": True}) == Rule(audience="b", drop=True)
    with pytest.raises(ValueError, match="probability"):
        Rule(probability=2)


def test_cli_rejects_a_bad_rule(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--rule", '{"status": "nope"}'])
    assert exit_info.value.code == 2
    assert "bad rule" in capsys.readouterr().err


async def test_capacity_set_over_the_control_api_makes_requests_wait_their_turn(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    body = {"rules": [], "latency_ms": 50, "capacity": 1}
    async with session.put(f"{provider.url}/_control/rules", json=body) as response:
        assert (await response.json())["capacity"] == 1
    started = time.monotonic()
    answers = await asyncio.gather(*(send(session, provider, f"k{n}") for n in range(3)))
    assert [status for status, _ in answers] == [200, 200, 200]
    assert time.monotonic() - started >= 0.15  # one at a time, 50 ms each
    async with session.get(f"{provider.url}/_control/stats") as response:
        stats = await response.json()
    assert stats == {"requests": 3, "accepted": 3, "latency_ms": 50, "capacity": 1}


async def test_control_api_rejects_a_capacity_below_one(
    provider: DemoProvider, session: aiohttp.ClientSession
) -> None:
    body = {"rules": [], "capacity": 0}
    async with session.put(f"{provider.url}/_control/rules", json=body) as response:
        assert response.status == 400
    assert provider.capacity is None
