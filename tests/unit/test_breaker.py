"""The partition breaker's state machine, with the clock and the randomness passed in."""

from __future__ import annotations

import dataclasses
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from worker import breaker
from worker.breaker import Admission, BreakerConfig, PartitionHealth, State

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CONFIG = BreakerConfig(failures=3, break_seconds=1.0, max_break_seconds=8.0)


def fail(
    health: PartitionHealth,
    times: int = 1,
    *,
    retry_after: float | None = None,
    probe_token: uuid.UUID | None = None,
    provider_outage: bool = False,
) -> PartitionHealth:
    rng = random.Random(1)
    for _ in range(times):
        health = breaker.on_failure(
            health,
            NOW,
            CONFIG,
            rng,
            error="HTTP 500",
            retry_after=retry_after,
            probe_token=probe_token,
            provider_outage=provider_outage,
        )
    return health


def probe_of(token: uuid.UUID) -> PartitionHealth:
    """A partition opened by 3 failures, then taken as the probe ``token`` when its break ended."""
    opened = fail(PartitionHealth("email|b"), 3)
    assert opened.open_until is not None
    probing = breaker.take_probe(opened, opened.open_until, token, 25)
    assert probing is not None
    return probing


def test_unknown_and_closed_partitions_send() -> None:
    assert breaker.admit(None, NOW) is Admission.SEND
    assert breaker.admit(PartitionHealth("email|b"), NOW) is Admission.SEND


def test_opens_after_the_threshold_of_failures_in_a_row() -> None:
    health = fail(PartitionHealth("email|b"), 2)
    assert (health.state, health.consecutive_failures) == (State.CLOSED, 2)
    health = fail(health)
    assert (health.state, health.trips, health.opened_at) == (State.OPEN, 1, NOW)
    assert health.open_until is not None
    assert NOW + timedelta(seconds=0.5) <= health.open_until <= NOW + timedelta(seconds=1)
    assert breaker.admit(health, NOW) is Admission.PARK


def test_a_success_resets_the_count() -> None:
    health = breaker.on_success(fail(PartitionHealth("email|b"), 2), NOW)
    assert health.consecutive_failures == 0
    assert fail(health, 2).state is State.CLOSED


@pytest.mark.parametrize(
    ("trips", "low", "high"),
    [(1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (4, 4.0, 8.0), (9, 4.0, 8.0)],
)
def test_the_break_doubles_per_trip_capped_with_equal_jitter(
    trips: int, low: float, high: float
) -> None:
    draws = [breaker.break_seconds(trips, CONFIG, random.Random(seed)) for seed in range(200)]
    assert low <= min(draws)
    assert max(draws) <= high
    assert max(draws) - min(draws) > (high - low) / 2  # jittered, not one value


def test_after_the_break_one_probe_then_park() -> None:
    opened = fail(PartitionHealth("email|b"), 3)
    assert opened.open_until is not None
    later = opened.open_until + timedelta(milliseconds=1)
    assert breaker.admit(opened, later) is Admission.PROBE
    token = uuid.uuid4()
    probing = breaker.take_probe(opened, later, token, lease_seconds=25)
    assert probing is not None
    assert (probing.state, probing.probe_token, probing.probed_at) == (
        State.HALF_OPEN,
        token,
        later,
    )
    # the others park; the probe itself is sent; nobody else takes it
    assert breaker.admit(probing, later) is Admission.PARK
    assert breaker.admit(probing, later, token) is Admission.SEND
    assert breaker.take_probe(probing, later, uuid.uuid4(), 25) is None


def test_a_successful_probe_closes_the_partition() -> None:
    token = uuid.uuid4()
    probing = probe_of(token)
    closed = breaker.on_success(probing, NOW, token)
    assert closed == PartitionHealth("email|b", healed_at=NOW)
    assert closed.healthy


def test_only_the_probe_closes_an_open_partition() -> None:
    token = uuid.uuid4()
    probing = probe_of(token)
    opened = fail(PartitionHealth("email|b"), 3)
    straggler = breaker.on_success(probing, NOW, None)  # a send already in flight when it opened
    assert straggler.state is State.HALF_OPEN
    assert breaker.on_success(opened, NOW, None).state is State.OPEN


def test_a_failed_probe_opens_it_again_for_longer() -> None:
    token = uuid.uuid4()
    probing = probe_of(token)
    again = fail(probing, probe_token=token)
    assert (again.state, again.trips, again.probe_token) == (State.OPEN, 2, None)
    assert again.opened_at == NOW
    assert again.open_until is not None
    assert again.open_until >= NOW + timedelta(seconds=1)


def test_a_probe_whose_replica_died_is_taken_over_after_its_lease() -> None:
    opened = fail(PartitionHealth("email|b"), 3)
    assert opened.open_until is not None
    probing = breaker.take_probe(opened, opened.open_until, uuid.uuid4(), lease_seconds=25)
    assert probing is not None
    assert probing.probe_until is not None
    assert breaker.admit(probing, probing.probe_until - timedelta(seconds=1)) is Admission.PARK
    after = probing.probe_until + timedelta(milliseconds=1)
    assert breaker.admit(probing, after) is Admission.PROBE
    assert breaker.take_probe(probing, after, uuid.uuid4(), 25) is not None


def test_an_abandoned_probe_lets_the_next_message_probe_at_once() -> None:
    token = uuid.uuid4()
    probing = probe_of(token)
    assert probing.probed_at is not None
    assert breaker.abandon_probe(probing, uuid.uuid4()) is None
    abandoned = breaker.abandon_probe(probing, token)
    assert abandoned is not None
    assert breaker.admit(abandoned, probing.probed_at) is Admission.PROBE


def test_retry_after_throttles_the_whole_partition() -> None:
    health = fail(PartitionHealth("sms|c"), retry_after=30.0)
    assert (health.state, health.consecutive_failures) == (State.OPEN, 1)
    assert health.open_until == NOW + timedelta(seconds=30)
    assert breaker.admit(health, NOW + timedelta(seconds=29)) is Admission.PARK
    assert breaker.admit(health, NOW + timedelta(seconds=31)) is Admission.PROBE


def test_a_first_attempt_probes_before_the_break_is_over_at_most_once_per_spacing() -> None:
    config = BreakerConfig(failures=3, break_seconds=4.0, max_break_seconds=8.0)
    opened = fail(PartitionHealth("email|b"), 3)  # opened at NOW for 0.5–1 s of CONFIG's break
    opened = dataclasses.replace(opened, open_until=NOW + timedelta(seconds=4))
    soon = NOW + timedelta(seconds=config.fresh_probe_seconds / 2)
    later = NOW + timedelta(seconds=config.fresh_probe_seconds * 2)
    # a retry waits for the break; a first attempt only for the spacing since the opening
    assert breaker.admit(opened, later) is Admission.PARK
    assert (
        breaker.admit(opened, soon, fresh_probe_seconds=config.fresh_probe_seconds)
        is Admission.PARK
    )
    assert (
        breaker.admit(opened, later, fresh_probe_seconds=config.fresh_probe_seconds)
        is Admission.PROBE
    )
    assert breaker.take_probe(opened, later, uuid.uuid4(), 25) is None
    token = uuid.uuid4()
    probing = breaker.take_probe(
        opened, later, token, 25, fresh_probe_seconds=config.fresh_probe_seconds
    )
    assert probing is not None
    # one probe at a time: the next first attempt parks while it is in flight
    assert (
        breaker.admit(probing, later, fresh_probe_seconds=config.fresh_probe_seconds)
        is Admission.PARK
    )
    # failed: the break grows for the retries, the first attempts probe again after the spacing
    again = fail(probing, probe_token=token)
    assert again.state is State.OPEN
    spaced = later + timedelta(seconds=config.fresh_probe_seconds * 1.5)
    assert (
        breaker.admit(again, spaced, fresh_probe_seconds=config.fresh_probe_seconds)
        is Admission.PROBE
    )
    assert breaker.admit(again, spaced) is Admission.PARK
    off = BreakerConfig(failures=3, break_seconds=4.0, fresh_probe_seconds=0)
    assert (
        breaker.admit(again, spaced, fresh_probe_seconds=off.fresh_probe_seconds) is Admission.PARK
    )


def test_no_first_attempt_probes_a_partition_throttled_by_retry_after() -> None:
    config = BreakerConfig(failures=3, break_seconds=1.0, max_break_seconds=8.0)
    throttled = fail(PartitionHealth("sms|c"), retry_after=30.0)
    assert throttled.throttled_until == NOW + timedelta(seconds=30)
    inside = NOW + timedelta(seconds=29)
    assert (
        breaker.admit(throttled, inside, fresh_probe_seconds=config.fresh_probe_seconds)
        is Admission.PARK
    )
    after = NOW + timedelta(seconds=31)
    assert (
        breaker.admit(throttled, after, fresh_probe_seconds=config.fresh_probe_seconds)
        is Admission.PROBE
    )


def test_a_retry_after_too_long_for_a_datetime_throttles_for_the_cap() -> None:
    health = fail(PartitionHealth("sms|c"), retry_after=999_999_999_999.0)
    cap = NOW + timedelta(seconds=CONFIG.max_throttle_seconds)
    assert (health.open_until, health.throttled_until) == (cap, cap)


def test_in_a_provider_wide_outage_first_attempts_probe_at_their_own_spacing() -> None:
    config = BreakerConfig(failures=3, break_seconds=1.0, fresh_probe_seconds=0.2)
    opened = [fail(PartitionHealth(f"email|{a}"), 3) for a in "ab"]
    probed = breaker.take_probe(opened[0], NOW + timedelta(seconds=5), uuid.uuid4(), 25)
    assert probed is not None
    failed = fail(probed, probe_token=probed.probe_token)
    states = [failed, opened[1]]
    after = NOW + timedelta(seconds=5.3)  # past the fresh spacing, within the base break
    assert breaker.probing_elsewhere(states, "email|b", after, config)
    assert not breaker.probing_elsewhere(states, "email|b", after, config, 0.2)


def test_a_held_partition_parks_everything_until_closed() -> None:
    held = breaker.hold(PartitionHealth("email|b"), NOW)
    assert (held.state, held.held) == (State.OPEN, True)
    for when in (NOW, NOW + timedelta(days=1)):
        assert breaker.admit(held, when) is Admission.PARK
    assert breaker.take_probe(held, NOW + timedelta(days=1), uuid.uuid4(), 25) is None
    assert fail(held, 10).state is State.OPEN
    assert fail(held, 10).held
    assert breaker.close(held, NOW).healthy
    assert breaker.healed_since(breaker.close(held, NOW), NOW - timedelta(seconds=1))
    assert not breaker.healed_since(breaker.close(held, NOW), NOW)


def test_provider_wide_outage_opens_on_one_failure_and_probes_one_at_a_time() -> None:
    opened = [fail(PartitionHealth(f"email|{a}"), 3) for a in "abc"]
    assert breaker.provider_outage(opened, partitions_in_use=4, config=CONFIG)
    assert not breaker.provider_outage(opened[:1], partitions_in_use=8, config=CONFIG)
    assert not breaker.provider_outage(opened, partitions_in_use=8, config=CONFIG)
    first = fail(PartitionHealth("sms|d"), provider_outage=True)
    assert first.state is State.OPEN

    later = NOW + timedelta(seconds=10)
    probing = breaker.take_probe(opened[0], later, uuid.uuid4(), 25)
    assert probing is not None
    states = [probing, *opened[1:]]
    assert breaker.probing_elsewhere(states, "email|b", later, CONFIG)
    assert breaker.admit(opened[1], later, probing_elsewhere=True) is Admission.PARK
    # at most one probe per base break across partitions, even when each fails fast
    failed = fail(probing, probe_token=probing.probe_token)
    states = [failed, *opened[1:]]
    assert breaker.probing_elsewhere(states, "email|b", later + timedelta(seconds=0.5), CONFIG)
    assert not breaker.probing_elsewhere(states, "email|b", later + timedelta(seconds=1.1), CONFIG)


def test_the_next_probe_is_due_at_the_first_break_or_lease_to_end() -> None:
    opened = fail(PartitionHealth("email|b"), 3)
    assert opened.open_until is not None
    probing = probe_of(uuid.uuid4())
    assert probing.probe_until is not None
    held = breaker.hold(PartitionHealth("sms|c"), NOW)
    healed = breaker.close(opened, NOW)
    states = [probing, opened, held, healed]
    assert breaker.next_probe_due(states, NOW) == opened.open_until
    # a break already over is not waited for; then the probe's lease is next
    assert breaker.next_probe_due(states, opened.open_until) == probing.probe_until
    assert breaker.next_probe_due(states, probing.probe_until) is None
    assert breaker.next_probe_due([held, healed], NOW) is None


def test_partition_key_joins_the_chosen_fields() -> None:
    values = {"ticker": "AAPL", "channel": "email", "audience": "premium"}
    assert breaker.partition_key(("channel", "audience"), values) == "email|premium"
    assert breaker.partition_key(("audience",), values) == "premium"
