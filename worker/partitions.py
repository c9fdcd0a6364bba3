"""The provider's health per partition, shared through PostgreSQL, and each replica's view of it.

Every replica keeps a :class:`PartitionBoard`: the rows of ``partition_health`` that are not
plainly healthy, re-read whenever another replica announces a change (``NOTIFY`` in the
change's transaction, so at its commit) and every ``REFRESH_SECONDS`` besides (one small
query), so that one replica's failures open a partition for all of them at once. Deciding
what to do with a message (:func:`worker.breaker.admit`) reads only that view: a healthy
partition costs the hot path nothing. The database is written only when a partition's health
changes (a failure, the first success after one, a probe), each time as one transaction that
locks the partition's row, applies the pure transition of :mod:`worker.breaker` and writes it
back: replicas never overwrite each other's counts, and exactly one of them wins a probe.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from worker import breaker, db_errors
from worker.breaker import Admission, BreakerConfig, PartitionHealth, State
from worker.errors import describe_error
from worker.metrics import PARTITION_OPENED, PARTITION_STATE, PARTITION_TRANSITIONS, PROBES
from worker.stopping import pause_unless_stopped

log = structlog.get_logger("worker.partitions")

REFRESH_SECONDS = 0.5
# A partition counts as in use (for the provider-wide outage rule) this long after its last message.
_IN_USE_SECONDS = 600.0
_STATE_VALUE = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}

_COLUMNS = (
    "partition_key, state, held, consecutive_failures, trips, opened_at, open_until, "
    "probe_token, probe_until, probed_at, healed_at, last_error, throttled_until"
)
_SELECT_UNHEALTHY = text(
    f"SELECT {_COLUMNS} FROM partition_health "
    "WHERE state <> 'closed' OR held OR consecutive_failures > 0"
    # healed lately: a retry that was on its way meanwhile is sent at once
    " OR healed_at > now() - interval '1 hour'"
)
# Every committed change is announced to all replicas (LISTEN/NOTIFY): "healed" wakes their
# release loops, "changed" refreshes their views. Polling stays the fallback.
NOTIFY_CHANNEL = "partition_health"
_NOTIFY = text(f"SELECT pg_notify('{NOTIFY_CHANNEL}', :event)")
_RELISTEN_SECONDS = 1.0
# In a provider-wide outage a heal heals every partition (_ALL_HEALED): two replicas healing
# two partitions at once would each hold its own row and wait for the other's, a deadlock
# PostgreSQL breaks only after deadlock_timeout (1 s). Their transitions take this
# transaction-scoped advisory lock first, so they run one at a time.
_OUTAGE_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('partition_health outage'))")
_ENSURE = text("INSERT INTO partition_health (partition_key) VALUES (:key) ON CONFLICT DO NOTHING")
_SELECT_ONE = f"SELECT {_COLUMNS}, now() AS now FROM partition_health WHERE partition_key = :key"
_LOCK = text(f"{_SELECT_ONE} FOR UPDATE")
_WRITE = text(
    """
    UPDATE partition_health
    SET state = :state, held = :held, consecutive_failures = :consecutive_failures,
        trips = :trips, opened_at = :opened_at, open_until = :open_until,
        probe_token = :probe_token, probe_until = :probe_until, probed_at = :probed_at,
        healed_at = :healed_at, last_error = :last_error, throttled_until = :throttled_until,
        changed_at = now()
    WHERE partition_key = :key
    """
)

# A partition healed: what was parked for its backoff is due at once, whatever the backoff.
_DUE_NOW = text(
    "UPDATE parked_messages SET due_at = now() WHERE partition_key = :key AND due_at > now()"
)
# ... and in a provider-wide outage, the provider is back: every partition it opened heals
# with it (one still broken opens again after its failures), and all their rows are due.
_ALL_HEALED = text(
    """
    WITH healed AS (
        UPDATE partition_health
        SET state = 'closed', consecutive_failures = 0, trips = 0, opened_at = NULL,
            open_until = NULL, probe_token = NULL, probe_until = NULL, healed_at = now(),
            throttled_until = NULL, changed_at = now()
        WHERE state <> 'closed' AND NOT held
          AND (throttled_until IS NULL OR throttled_until <= now())
        RETURNING partition_key
    )
    UPDATE parked_messages SET due_at = now()
    WHERE due_at > now() AND partition_key IN (SELECT partition_key FROM healed)
    """
)


def _health(row: Any) -> PartitionHealth:
    return PartitionHealth(
        key=row.partition_key,
        state=State(row.state),
        held=row.held,
        consecutive_failures=row.consecutive_failures,
        trips=row.trips,
        opened_at=row.opened_at,
        open_until=row.open_until,
        probe_token=row.probe_token,
        probe_until=row.probe_until,
        probed_at=row.probed_at,
        healed_at=row.healed_at,
        last_error=row.last_error,
        throttled_until=row.throttled_until,
    )


Transition = Callable[[PartitionHealth, datetime], PartitionHealth | None]


async def transition(
    conn: AsyncConnection, key: str, change: Transition, provider_outage: bool = False
) -> tuple[PartitionHealth, PartitionHealth]:
    """Apply ``change`` to the partition's row under its lock, in the caller's transaction.

    ``change`` gets the row and the database's clock and returns the new state, or None to
    leave it as it is. Returns (before, after). A partition that heals has its parked
    messages made due in the same transaction.
    """
    if provider_outage:
        await conn.execute(_OUTAGE_LOCK)
    await conn.execute(_ENSURE, {"key": key})
    row = (await conn.execute(_LOCK, {"key": key})).one()
    before = _health(row)
    after = change(before, row.now)
    if after is None or after == before:
        return before, before
    await conn.execute(
        _WRITE,
        {
            "key": key,
            "state": after.state.value,
            "held": after.held,
            "consecutive_failures": after.consecutive_failures,
            "trips": after.trips,
            "opened_at": after.opened_at,
            "open_until": after.open_until,
            "probe_token": after.probe_token,
            "probe_until": after.probe_until,
            "probed_at": after.probed_at,
            "healed_at": after.healed_at,
            "last_error": after.last_error,
            "throttled_until": after.throttled_until,
        },
    )
    healed = after.healthy and not (before.state is State.CLOSED and not before.held)
    if healed:
        await conn.execute(_DUE_NOW, {"key": key})
        if provider_outage:
            await conn.execute(_ALL_HEALED)
    await conn.execute(_NOTIFY, {"event": "healed" if healed else "changed"})
    return before, after


def _export(health: PartitionHealth) -> None:
    PARTITION_STATE.labels(health.key).set(_STATE_VALUE[health.state])
    opened = health.opened_at if health.state is not State.CLOSED else None
    PARTITION_OPENED.labels(health.key).set(0 if opened is None else opened.timestamp())


def log_transition(before: PartitionHealth, after: PartitionHealth, cause: str) -> None:
    if before.state is after.state and before.held == after.held:
        return
    PARTITION_TRANSITIONS.labels(after.state.value).inc()
    log.warning(
        "partition_" + ("held" if after.held else after.state.value),
        partition=after.key,
        previous=before.state.value,
        cause=cause,
        consecutive_failures=after.consecutive_failures,
        trips=after.trips,
        open_until=None if after.open_until is None else after.open_until.isoformat(),
        error=after.last_error,
    )


class PartitionBoard:
    """One replica's view of every partition's health, and its writes of changes."""

    def __init__(
        self,
        engine: AsyncEngine,
        fields: tuple[str, ...],
        config: BreakerConfig,
        lease_seconds: float,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        # the engine is in autocommit; a transition locks its row for a transaction
        self._transactions = engine.execution_options(isolation_level="READ COMMITTED")
        self.fields = fields
        self.config = config
        self._lease_seconds = lease_seconds
        self._rng = rng or random.Random()
        self._states: dict[str, PartitionHealth] = {}
        self.healed = asyncio.Event()  # a partition healed: its parked messages are due
        self._in_use: dict[str, float] = {}
        self._stale = False  # a change was announced since the view was last read
        self._following: asyncio.Task[None] | None = None

    def key_of(self, message: object) -> str:
        """The partition of a message: its ``fields``' values, ``|``-joined."""
        return breaker.partition_key(self.fields, {f: getattr(message, f) for f in self.fields})

    def get(self, key: str) -> PartitionHealth | None:
        return self._states.get(key)

    @property
    def unhealthy(self) -> Iterable[PartitionHealth]:
        return self._states.values()

    def provider_outage(self) -> bool:
        now = time.monotonic()
        in_use = sum(1 for seen in self._in_use.values() if now - seen < _IN_USE_SECONDS)
        return breaker.provider_outage(self._states.values(), in_use, self.config)

    @property
    def enabled(self) -> bool:
        """``WORKER_BREAKER_FAILURES=0`` turns partition health off."""
        return self.config.failures > 0

    def admit(
        self, key: str, probe_token: uuid.UUID | None, first_attempt: bool = False
    ) -> Admission:
        self._in_use[key] = time.monotonic()
        health = self._states.get(key)
        if health is None or (health.state is State.CLOSED and not health.held):
            return Admission.SEND  # the common case decided without looking at the others
        now = datetime.now(UTC)
        spacing = self._fresh_spacing(first_attempt)
        elsewhere = self.provider_outage() and breaker.probing_elsewhere(
            self._states.values(), key, now, self.config, spacing
        )
        return breaker.admit(health, now, probe_token, elsewhere, spacing)

    def seconds_to_next_probe(self, keys: Iterable[str]) -> float | None:
        """How long until one of these partitions may be probed again (None: none is open)."""
        now = datetime.now(UTC)
        states = (health for key in keys if (health := self._states.get(key)) is not None)
        due = breaker.next_probe_due(states, now)
        return None if due is None else (due - now).total_seconds()

    def _fresh_spacing(self, first_attempt: bool) -> float:
        """How soon a message may probe before the break is over: first attempts only."""
        return self.config.fresh_probe_seconds if first_attempt else 0.0

    async def refresh(self) -> None:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(_SELECT_UNHEALTHY)).all()
        fresh = {row.partition_key: _health(row) for row in rows}
        for key in self._states.keys() - fresh.keys():
            _export(PartitionHealth(key=key))
        for health in fresh.values():
            _export(health)
        self._states = fresh

    async def listen(self, stop: asyncio.Event) -> None:
        """Follow the changes of every replica as they commit, until stopped: a heal wakes
        the release loop (``healed``), any other change refreshes the view at once. A
        notification lost with a connection is only late: the view is polled as well."""
        while not stop.is_set():
            try:
                await self._listen(stop)
            except (SQLAlchemyError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("partition_listen_failed", error=describe_error(exc))
            await pause_unless_stopped(stop, _RELISTEN_SECONDS)

    async def _listen(self, stop: asyncio.Event) -> None:
        async with self._engine.connect() as conn:
            driver: Any = (await conn.get_raw_connection()).driver_connection
            lost = asyncio.Event()
            driver.add_termination_listener(lambda _connection: lost.set())
            await driver.add_listener(NOTIFY_CHANNEL, self._notified)
            self.healed.set()  # catch up on what changed while nobody listened
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            if lost.is_set():
                await conn.invalidate()
                log.warning("partition_listen_lost")
            else:
                await driver.remove_listener(NOTIFY_CHANNEL, self._notified)

    def _notified(self, _connection: object, _pid: int, _channel: str, event: str) -> None:
        if event == "healed":
            self.healed.set()
            return
        self._stale = True
        if self._following is None or self._following.done():
            self._following = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        while self._stale:
            self._stale = False
            try:
                await self.refresh()
            except (SQLAlchemyError, OSError) as exc:
                log.info("partition_refresh_failed", error=describe_error(exc))
                return

    async def reread(self, key: str) -> PartitionHealth | None:
        """The partition's row now (a message released as a probe may be newer than the view)."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(text(_SELECT_ONE), {"key": key})).one_or_none()
        if row is not None:
            self._remember(_health(row))
        return self._states.get(key)

    def _remember(self, health: PartitionHealth) -> None:
        if health == PartitionHealth(key=health.key):
            self._states.pop(health.key, None)
        else:  # kept when healthy but healed lately: healed_at decides for retries on their way
            self._states[health.key] = health
        _export(health)

    async def change(self, key: str, change: Transition, cause: str) -> PartitionHealth:
        """Write a transition of the partition, remember its result, log it if it moved."""
        outage = self.provider_outage()

        async def attempt() -> tuple[PartitionHealth, PartitionHealth]:
            async with self._transactions.begin() as conn:
                return await transition(conn, key, change, outage)

        # a deadlock or serialisation failure changed nothing: once more (worker.db_errors)
        before, after = await db_errors.retrying(attempt)
        self._remember(after)
        log_transition(before, after, cause)
        if after.healthy and not before.healthy:
            self.healed.set()  # this replica's release loop goes at once, not at its next tick
        return after

    async def take_probe(self, key: str, first_attempt: bool = False) -> uuid.UUID | None:
        """Become the partition's one probe across the fleet; its token, or None (lost)."""
        token = uuid.uuid4()
        after = await self.change(
            key,
            lambda health, now: breaker.take_probe(
                health, now, token, self._lease_seconds, self._fresh_spacing(first_attempt)
            ),
            "first attempt" if first_attempt else "break over",
        )
        return token if after.probe_token == token else None

    async def abandon_probe(self, key: str, token: uuid.UUID) -> None:
        await self.change(
            key, lambda health, now: breaker.abandon_probe(health, token), "probe not sent"
        )

    async def report_failure(
        self,
        key: str,
        error: str,
        retry_after: float | None,
        probe_token: uuid.UUID | None,
    ) -> PartitionHealth:
        if not self.enabled:
            return PartitionHealth(key=key)
        outage = self.provider_outage()
        if probe_token is not None:
            PROBES.labels("failed").inc()
        return await self.change(
            key,
            lambda health, now: breaker.on_failure(
                health,
                now,
                self.config,
                self._rng,
                error=error,
                retry_after=retry_after,
                probe_token=probe_token,
                provider_outage=outage,
            ),
            "probe failed" if probe_token is not None else "failures",
        )

    async def report_success(self, key: str, probe_token: uuid.UUID | None) -> None:
        """Nothing to write for a partition the view holds healthy: the hot path stays free."""
        if not self.enabled:
            return
        if probe_token is not None:
            PROBES.labels("succeeded").inc()
        else:
            health = self._states.get(key)
            if health is None or health.healthy:
                return
        await self.change(
            key, lambda health, now: breaker.on_success(health, now, probe_token), "probe succeeded"
        )

    async def hold(self, key: str) -> PartitionHealth:
        return await self.change(key, lambda health, now: breaker.hold(health, now), "operator")

    async def close(self, key: str) -> PartitionHealth:
        return await self.change(key, lambda health, now: breaker.close(health, now), "operator")
