"""The health of one provider partition, as a pure state machine (clock and randomness passed in).

A *partition* is what the provider fails for as a whole: by default a (channel, audience). Its
breaker is **closed** while the provider serves it; ``failures`` transient failures in a row
(5, as Envoy's ``consecutive_5xx`` and Finagle's failure accrual) **open** it for a *break*;
when the break is over, exactly one message is sent as a **probe** (**half-open**); its
success closes the partition, its failure opens it again for a longer break.

- The break grows with the trips in a row, ``base · 2^(trips-1)`` capped, with *equal jitter*
  (a uniform draw in [d/2, d], Finagle's ``equalJittered``), so replicas and partitions that
  opened together do not probe together.
- A *first attempt* (a fresh message, a replay) does not wait out the break: it may probe
  once ``fresh_probe_seconds`` have passed since the partition opened or was last probed, so
  that after a recovery fresh alerts go out within about that time, not after the break. The
  cost is bounded by time, not by traffic: at most one call per ``fresh_probe_seconds`` per open
  partition (in a provider-wide outage, per fleet), and only while first attempts arrive.
- A probe whose replica dies is not waited for past its lease: the partition can be probed
  again (:func:`admit` says PROBE once ``probe_until`` has passed).
- A 429 with ``Retry-After`` opens the partition for that long: the throttle is the
  partition's, not only the one message's, and no first attempt probes before it ends.
- An operator can *hold* a partition open (the plan lapsed: nothing will help until it is
  paid) and *close* it at once.
- When most partitions are open at once the provider itself is down (Envoy's
  ``max_ejection_percent`` reasoning, turned round): one failure then opens a partition, and at
  most one probe is in flight across all partitions, so the fleet probes at a trickle; the
  first probe that succeeds heals every partition the outage opened.

Only transient failures (the ``retry`` verdict: timeouts, 5xx, 408/425/429) count; a 4xx that
rejects one message says the provider is answering, and counts as a success.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Admission(StrEnum):
    SEND = "send"  # call the provider
    PARK = "park"  # keep the message aside until the partition heals
    PROBE = "probe"  # the break is over: try to become the partition's one probe


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int = 5
    break_seconds: float = 0.5
    max_break_seconds: float = 1.0
    fresh_probe_seconds: float = 0.2
    # the longest a Retry-After throttles a partition (the worker: WORKER_BACKOFF_MAX_SECONDS,
    # the cap of the message's own wait)
    max_throttle_seconds: float = 3600.0
    # provider-wide outage: at least this many partitions open, and at least this share of
    # the partitions in use
    outage_partitions: int = 2
    outage_ratio: float = 0.5


@dataclass(frozen=True, slots=True)
class PartitionHealth:
    key: str
    state: State = State.CLOSED
    held: bool = False
    consecutive_failures: int = 0
    trips: int = 0
    opened_at: datetime | None = None
    open_until: datetime | None = None
    probe_token: uuid.UUID | None = None
    probe_until: datetime | None = None
    probed_at: datetime | None = None
    healed_at: datetime | None = None  # when it last closed after being open
    last_error: str | None = None
    throttled_until: datetime | None = None  # a Retry-After's end

    @property
    def healthy(self) -> bool:
        """Closed with no failure since the last success: nothing to record for a success."""
        return self.state is State.CLOSED and not self.held and self.consecutive_failures == 0

    def probing(self, now: datetime) -> bool:
        """A probe of this partition is in flight (its lease has not run out)."""
        return (
            self.state is State.HALF_OPEN
            and self.probe_until is not None
            and self.probe_until > now
        )

    def probed_since(self, since: datetime) -> bool:
        return self.probing(since) or (self.probed_at is not None and self.probed_at > since)

    def tried_since(self, since: datetime) -> bool:
        """Probed, or opened, after ``since``: too soon for a first attempt to probe."""
        last = max((t for t in (self.probed_at, self.opened_at) if t is not None), default=None)
        return self.probing(since) or (last is not None and last > since)

    def throttled(self, now: datetime) -> bool:
        return self.throttled_until is not None and self.throttled_until > now


def break_seconds(trips: int, config: BreakerConfig, rng: random.Random) -> float:
    """The break after ``trips`` trips in a row (1, 2, …): doubled each time, capped, jittered."""
    full: float = min(config.break_seconds * 2.0 ** max(trips - 1, 0), config.max_break_seconds)
    return full / 2 + rng.random() * full / 2


def admit(
    health: PartitionHealth | None,
    now: datetime,
    probe_token: uuid.UUID | None = None,
    probing_elsewhere: bool = False,
    fresh_probe_seconds: float = 0.0,
) -> Admission:
    """What to do with a message of the partition. ``probe_token``: the probe the message was
    released as, if any; ``probing_elsewhere``: in a provider-wide outage, another partition's
    probe is in flight (one at a time); ``fresh_probe_seconds``: for a first attempt, the
    config's spacing: it may probe before the break is over (0: it waits for the break)."""
    if health is None:
        return Admission.SEND
    if health.held:
        return Admission.PARK
    if health.state is State.CLOSED:
        return Admission.SEND
    if health.state is State.HALF_OPEN:
        if probe_token is not None and probe_token == health.probe_token:
            return Admission.SEND
        if health.probing(now):
            return Admission.PARK
    elif (
        health.open_until is not None
        and health.open_until > now
        and not _fresh_may_probe(health, now, fresh_probe_seconds)
    ):
        return Admission.PARK
    return Admission.PARK if probing_elsewhere else Admission.PROBE


def _fresh_may_probe(health: PartitionHealth, now: datetime, spacing: float) -> bool:
    return (
        spacing > 0
        and not health.throttled(now)
        and not health.tried_since(now - timedelta(seconds=spacing))
    )


def take_probe(
    health: PartitionHealth,
    now: datetime,
    token: uuid.UUID,
    lease_seconds: float,
    fresh_probe_seconds: float = 0.0,
) -> PartitionHealth | None:
    """Become the partition's probe, or None when it is not (or no longer) to be probed."""
    if admit(health, now, fresh_probe_seconds=fresh_probe_seconds) is not Admission.PROBE:
        return None
    return replace(
        health,
        state=State.HALF_OPEN,
        probe_token=token,
        probe_until=now + timedelta(seconds=lease_seconds),
        probed_at=now,
    )


def abandon_probe(health: PartitionHealth, token: uuid.UUID) -> PartitionHealth | None:
    """The probe's message ended without a provider call (finished, superseded, deferred):
    let another message probe at once rather than after the probe's lease."""
    if health.state is not State.HALF_OPEN or health.probe_token != token:
        return None
    return replace(
        health, state=State.OPEN, open_until=health.probed_at, probe_token=None, probe_until=None
    )


def on_failure(
    health: PartitionHealth,
    now: datetime,
    config: BreakerConfig,
    rng: random.Random,
    *,
    error: str,
    retry_after: float | None = None,
    probe_token: uuid.UUID | None = None,
    provider_outage: bool = False,
) -> PartitionHealth:
    """A transient failure of a send of this partition."""
    failures = health.consecutive_failures + 1
    health = replace(health, consecutive_failures=failures, last_error=error[:300])
    if health.held:
        return health
    is_probe = health.state is State.HALF_OPEN and probe_token == health.probe_token
    threshold = 1 if provider_outage else config.failures
    if is_probe or (health.state is State.CLOSED and failures >= threshold):
        trips = health.trips + 1
        until = now + timedelta(seconds=break_seconds(trips, config, rng))
        health = replace(
            health,
            state=State.OPEN,
            trips=trips,
            opened_at=health.opened_at if health.state is not State.CLOSED else now,
            open_until=until,
            probe_token=None,
            probe_until=None,
        )
    if retry_after is not None and retry_after > 0:
        # bounded: a Retry-After of 12 digits would not even fit a datetime
        until = now + timedelta(seconds=min(retry_after, config.max_throttle_seconds))
        health = replace(
            health,
            state=State.OPEN,
            opened_at=health.opened_at or now,
            open_until=max(until, health.open_until or until),
            throttled_until=max(until, health.throttled_until or until),
            probe_token=None,
            probe_until=None,
        )
    return health


def on_success(
    health: PartitionHealth, now: datetime, probe_token: uuid.UUID | None = None
) -> PartitionHealth:
    """The provider answered a send of this partition (accepted, duplicate, or rejected it).

    Only the probe closes an open partition: a send that was already in flight when it opened
    proves less than the probe the fleet agreed on.
    """
    if health.state is State.HALF_OPEN and probe_token == health.probe_token and not health.held:
        return close(health, now)
    return replace(health, consecutive_failures=0)


def close(health: PartitionHealth, now: datetime) -> PartitionHealth:
    """Healthy now (a probe succeeded, or an operator says so): everything parked is released."""
    return PartitionHealth(key=health.key, healed_at=now)


def healed_since(health: PartitionHealth | None, moment: datetime) -> bool:
    """Closed after having been open, later than ``moment``."""
    return health is not None and health.healed_at is not None and health.healed_at > moment


def hold(health: PartitionHealth, now: datetime) -> PartitionHealth:
    """Held open by an operator until closed by one: no probes, everything parks."""
    return replace(
        health,
        state=State.OPEN,
        held=True,
        opened_at=health.opened_at or now,
        open_until=None,
        probe_token=None,
        probe_until=None,
    )


def next_probe_due(states: Iterable[PartitionHealth], now: datetime) -> datetime | None:
    """The earliest moment after ``now`` a partition may be probed again: its break over, or
    its probe's lease run out. A partition held by an operator is not probed."""
    due = (
        health.open_until if health.state is State.OPEN else health.probe_until
        for health in states
        if not health.held and health.state is not State.CLOSED
    )
    return min((moment for moment in due if moment is not None and moment > now), default=None)


def provider_outage(
    states: Iterable[PartitionHealth], partitions_in_use: int, config: BreakerConfig
) -> bool:
    """Most partitions open at once: the provider is down, not a partition of it."""
    opened = sum(1 for s in states if s.state is not State.CLOSED and not s.held)
    return opened >= config.outage_partitions and opened >= config.outage_ratio * max(
        partitions_in_use, 1
    )


def probing_elsewhere(
    states: Iterable[PartitionHealth],
    key: str,
    now: datetime,
    config: BreakerConfig,
    fresh_probe_seconds: float = 0.0,
) -> bool:
    """In a provider-wide outage, the fleet's one probe: another partition is being probed,
    or was within the base break (at most one probe per ``break_seconds`` in all; for a first
    attempt, per its ``fresh_probe_seconds``)."""
    since = now - timedelta(seconds=fresh_probe_seconds or config.break_seconds)
    return any(s.probed_since(since) for s in states if s.key != key)


def partition_key(fields: Iterable[str], values: Mapping[str, str]) -> str:
    """``channel|audience`` for the default fields."""
    return "|".join(values[name] for name in fields)
