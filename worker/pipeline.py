"""One message's way through the worker, from delivery to ack.

parse and validate → expired? → its partition healthy? (else park it) → claim the key and its
topic in PostgreSQL → stale? → call the provider → classify the answer → tell the partition's
breaker → record the outcome → ack, always last (sent with other deliveries' acks when the
outcome is final in PostgreSQL, :mod:`worker.acks`). A retry is published, publisher-confirmed, to
the delay backend before the original is acked, unless its partition is failing as a whole:
then it is parked until the partition heals or its backoff is over. A dead letter or a parked
message is committed before the ack. An error of the broker or an outage of the database
propagates to the replica, which returns the message unacked: it is then still on the queue,
never lost. A database refusing this message's data (:mod:`worker.db_errors`: SQLSTATE classes
22, 23, 54) is not an outage and not a reason to try again: the message is dead-lettered
``invalid`` on its own, with its exact bytes and its text made storable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import structlog
from aio_pika.abc import AbstractIncomingMessage

from worker import breaker, db_errors
from worker.acks import Acks
from worker.backoff import delay_seconds
from worker.breaker import Admission, PartitionHealth, State
from worker.decisions import (
    ClaimAction,
    Verdict,
    classify,
    decide_claim,
    is_expired,
    retry_delay,
)
from worker.delay import DelayBackend
from worker.envelope import RELEASED, Delivery, read_not_before, read_probe
from worker.errors import describe_error
from worker.message import InvalidMessage, PriceChange, parse_message
from worker.metrics import DEAD_LETTERS, DELIVERY_LATENCY, MESSAGES, RETRIES
from worker.overdue import copy_of
from worker.parking import Parked, ParkingLot
from worker.partitions import PartitionBoard
from worker.persistence import DeliveryStore
from worker.provider import ProviderAnswer, ProviderClient
from worker.settings import Settings

log = structlog.get_logger("worker.pipeline")

# While another replica sends a message of the same topic, wait here this long (the send
# usually takes milliseconds) before handing the message to the delay backend instead, for
# the rest of the lease but at most _MAX_DEFER_SECONDS: a lease outlives a crashed holder.
_LOCAL_WAIT_SECONDS = 1.0
_MAX_DEFER_SECONDS = 5.0
_CLAIM_ROUNDS = 20
# A retry's first hop in the delay backend lasts at most this many maximal breaks: long enough
# for its partition to open if it is failing as a whole, short enough to be released with it.
_HOP_BREAKS = 5
# A retry back from its hop less than this early is sent (the TTL cascade rounds to seconds).
_EARLY_TOLERANCE_SECONDS = 1.0


class Outcome(StrEnum):
    """What became of one delivery; dead-letter outcomes are named as their reasons."""

    SENT = "sent"
    DUPLICATE = "duplicate"  # the provider answered 409: accepted before
    RETRY = "retry"
    DEFERRED = "deferred"  # another message of the topic was in flight: come back later
    PARKED = "parked"  # its partition is open: kept in PostgreSQL until it heals
    SUPERSEDED = "superseded"
    ALREADY_FINISHED = "already_finished"  # a redelivered or duplicated copy: nothing to do
    INVALID = "invalid"
    REJECTED = "rejected"
    EXHAUSTED = "exhausted"
    EXPIRED = "expired"


DEAD_OUTCOMES = frozenset({Outcome.INVALID, Outcome.REJECTED, Outcome.EXHAUSTED, Outcome.EXPIRED})
# Handed on (to the delay backend, or parked) rather than settled in PostgreSQL: acked at once,
# so that the window in which a lost ack brings back a second copy stays as short as it was.
# Every other outcome is final in the database, a redelivered copy finds its key finished, and
# its ack is coalesced with others (worker.acks).
ACK_AT_ONCE = frozenset({Outcome.RETRY, Outcome.DEFERRED, Outcome.PARKED})


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        store: DeliveryStore,
        provider: ProviderClient,
        delay: DelayBackend,
        board: PartitionBoard,
        parking: ParkingLot,
        acks: Acks,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.acks = acks
        self.store = store
        self.provider = provider
        self.delay = delay
        self.board = board
        self.parking = parking
        self._rng = rng or random.Random()
        self._max_age = timedelta(seconds=settings.max_age_seconds)

    async def handle(self, incoming: AbstractIncomingMessage) -> Outcome:
        """Process one delivery to its end; returns the outcome. Acks only when finished."""
        fresh = incoming.exchange == self.settings.source_exchange
        delivery = Delivery.of(incoming, fresh=fresh)
        token = uuid.uuid4()
        try:
            outcome = await self._process(delivery, token)
        except Exception as exc:
            if not db_errors.is_data_error(exc):
                raise
            outcome = await self._refused(delivery, token, exc)
        await self.acks.ack(incoming, at_once=outcome in ACK_AT_ONCE)
        MESSAGES.labels(outcome.value).inc()
        if outcome in DEAD_OUTCOMES:
            DEAD_LETTERS.labels(outcome.value).inc()
        return outcome

    async def _refused(self, delivery: Delivery, token: uuid.UUID, error: Exception) -> Outcome:
        """The database refused this message's data: finish it alone, dead-lettered
        ``invalid`` (its lease released), with whatever it carries made storable; if even
        that is refused, as an invalid body without its headers."""
        state = db_errors.sqlstate(error) or "no SQLSTATE"
        cause = getattr(error, "orig", None) or error
        reason = f"the database refused the message's data ({state}): {describe_error(cause)}"
        raw = delivery.raw()
        try:
            message = parse_message(delivery.incoming.body, delivery.received_at)
        except InvalidMessage:
            message = None
        dead_id: int | None = None
        try:
            if message is not None:
                dead_id = await self.store.dead_letter(
                    Outcome.INVALID.value,
                    raw,
                    message,
                    reason,
                    attempts=delivery.attempt,
                    token=token,
                    provider_status=None,
                )
            else:
                dead_id = await self.store.dead_letter_invalid(raw, reason, delivery.attempt)
        except Exception as again:
            if not db_errors.is_data_error(again):
                raise
            bare = dataclasses.replace(raw, headers={}, sanitised=(*raw.sanitised, "headers"))
            dead_id = await self.store.dead_letter_invalid(bare, reason, delivery.attempt)
        log.warning(
            "dead_lettered",
            idempotency_key=None if message is None else message.idempotency_key,
            outcome=Outcome.INVALID,
            error=reason,
            dead_letter=dead_id,
        )
        return Outcome.INVALID if dead_id is not None else Outcome.ALREADY_FINISHED

    async def _process(self, delivery: Delivery, token: uuid.UUID) -> Outcome:
        try:
            message = parse_message(
                delivery.incoming.body,
                delivery.received_at,
                content_type=delivery.incoming.content_type,
                max_bytes=self.settings.max_body_bytes,
            )
        except InvalidMessage as exc:
            dead_id = await self.store.dead_letter_invalid(
                delivery.raw(), str(exc), delivery.attempt
            )
            if dead_id is None:  # redelivered after a crash before its ack
                log.info("already_finished", outcome=Outcome.ALREADY_FINISHED, error=str(exc))
                return Outcome.ALREADY_FINISHED
            log.warning("dead_lettered", outcome="invalid", error=str(exc), dead_letter=dead_id)
            return Outcome.INVALID
        bound = log.bind(idempotency_key=message.idempotency_key, attempt=delivery.attempt)
        expired = is_expired(message.occurred_at, delivery.received_at, self._max_age)
        if expired and not delivery.ignore_max_age:
            return await self._dead(delivery, message, Outcome.EXPIRED, "older than max age", None)

        # a fresh publish's control headers are not ours: no probe, no backoff of a first hop
        headers = {} if delivery.fresh else (delivery.incoming.headers or {})
        partition = self.board.key_of(message)
        admitted, probe = await self._admit(
            partition,
            read_probe(headers),
            released=bool(headers.get(RELEASED)),
            first_attempt=delivery.attempt == 0,
        )
        backoff = read_not_before(headers, delivery.received_at, self.settings.backoff_max_seconds)
        early = 0.0 if backoff is None else (backoff[1] - delivery.received_at).total_seconds()
        # Back from its first hop: if its partition opened and healed meanwhile, send it now,
        # whatever is left of its backoff (read from the database: the view may not show a
        # heal by another replica yet).
        if (
            admitted
            and probe is None
            and backoff is not None
            and early > _EARLY_TOLERANCE_SECONDS
            and breaker.healed_since(await self.board.reread(partition), backoff[0])
        ):
            early = 0.0
        if not admitted:
            await self._park(delivery, message, partition, delivery.attempt, None, max(early, 0))
            bound.info("parked", outcome=Outcome.PARKED, partition=partition)
            return Outcome.PARKED
        if probe is None and backoff is not None and early > _EARLY_TOLERANCE_SECONDS:
            # back from its first hop, its partition not open: the rest of its backoff
            await self.delay.publish(
                delivery.republish(delivery.attempt, None, self.settings.max_priority, backoff[1]),
                early,
            )
            bound.info("deferred", outcome=Outcome.DEFERRED, delay=round(early, 3))
            return Outcome.DEFERRED
        action, wait_seconds, recorded = await self._claim(message, delivery, token)
        if probe is not None and action is not ClaimAction.CLAIM:
            await self.board.abandon_probe(partition, probe)
        if action is ClaimAction.FINISHED:
            bound.info("already_finished", outcome=Outcome.ALREADY_FINISHED)
            return Outcome.ALREADY_FINISHED
        if action is ClaimAction.SUPERSEDED:
            await self.store.mark_superseded(message)
            bound.info("superseded", outcome=Outcome.SUPERSEDED)
            return Outcome.SUPERSEDED
        if recorded > delivery.attempt:
            # A copy of a second chain (its retry was published, its ack lost with the channel,
            # and the broker requeued it too): it continues from the attempts the key has
            # used, so two chains share one WORKER_MAX_ATTEMPTS.
            bound.info("attempts_from_record", recorded=recorded)
            delivery = dataclasses.replace(delivery, attempt=recorded)
            bound = bound.bind(attempt=recorded)
        if action is ClaimAction.WAIT:
            delivery.check_channel()
            await self.delay.publish(
                delivery.republish(delivery.attempt, None, self.settings.max_priority), wait_seconds
            )
            bound.info("deferred", outcome=Outcome.DEFERRED, delay=wait_seconds)
            return Outcome.DEFERRED

        answer = await self.provider.send(message)
        verdict = classify(answer.status, self.settings.retry_statuses)
        attempts = delivery.attempt + 1
        health: PartitionHealth | None = None
        if verdict is Verdict.RETRY:
            health = await self.board.report_failure(
                partition, answer.describe(), answer.retry_after, probe
            )
        else:
            await self.board.report_success(partition, probe)
        if verdict in (Verdict.SENT, Verdict.DUPLICATE):
            assert answer.status is not None
            await self.store.mark_sent(message, token, attempts, answer.status, answer.message_id)
            outcome = Outcome.SENT if verdict is Verdict.SENT else Outcome.DUPLICATE
            DELIVERY_LATENCY.observe((datetime.now(UTC) - message.occurred_at).total_seconds())
            bound.info("sent", outcome=outcome, provider_message_id=answer.message_id)
            return outcome
        if verdict is Verdict.REJECTED:
            reason = Outcome.REJECTED
        elif attempts >= self.settings.max_attempts:
            reason = Outcome.EXHAUSTED
        else:
            assert health is not None
            return await self._retry(delivery, message, answer, token, attempts, health)
        return await self._dead(delivery, message, reason, answer.describe(), answer, token)

    async def _admit(
        self, partition: str, probe: uuid.UUID | None, released: bool, first_attempt: bool
    ) -> tuple[bool, uuid.UUID | None]:
        """May the message be sent (else it is parked), and as which probe, if it is one.

        A first attempt may probe an open partition before its break is over
        (:func:`worker.breaker.admit`): a fresh alert is not held back by the break.
        """
        admission = self.board.admit(partition, probe, first_attempt)
        if admission is not Admission.SEND and (probe is not None or released):
            # released (as the probe, or as its partition healed) by another replica, whose
            # change this view may not show yet
            await self.board.reread(partition)
            admission = self.board.admit(partition, probe, first_attempt)
        if admission is Admission.SEND:
            health = self.board.get(partition)
            is_probe = probe is not None and health is not None and health.probe_token == probe
            return True, probe if is_probe else None
        if admission is Admission.PROBE:
            probe = await self.board.take_probe(partition, first_attempt)
            return probe is not None, probe
        return False, None

    async def _park(
        self,
        delivery: Delivery,
        message: PriceChange,
        partition: str,
        attempt: int,
        error: str | None,
        wait_seconds: float,
    ) -> None:
        """Keep the message in PostgreSQL until its partition heals, or its wait is over."""
        now = datetime.now(UTC)
        expires = (now if delivery.ignore_max_age else message.occurred_at) + self._max_age
        await self.parking.park(
            Parked(
                partition=partition,
                topic_key=message.topic_key,
                idempotency_key=message.idempotency_key,
                attempt=attempt,
                message=delivery.republish(attempt, error, self.settings.max_priority),
                occurred_at=message.occurred_at,
                due_at=now + timedelta(seconds=wait_seconds),
                expires_at=expires,
                payload_json=message.stored_payload_json,
                first_seen_at=delivery.first_seen_at,
            )
        )

    async def _claim(
        self, message: PriceChange, delivery: Delivery, token: uuid.UUID
    ) -> tuple[ClaimAction, float, int]:
        """Decide and, to send, win the topic lease; WAIT comes with the seconds to defer.

        The last item is the failed attempts the database has recorded for the key.
        """
        pause = 0.02
        waited = 0.0
        for _ in range(_CLAIM_ROUNDS):
            state, won = await self.store.claim(
                message, delivery.attempt, delivery.first_seen_at, token
            )
            action = decide_claim(state, message.occurred_at)
            if won:
                # the statement leased the topic only on this same decision
                assert action is ClaimAction.CLAIM, action
                return action, 0.0, state.attempts
            if action is ClaimAction.CLAIM:
                # the topic moved on (another replica), or a newer message of it in the same
                # batch took the lease: read it again
                continue
            if action is not ClaimAction.WAIT:
                return action, 0.0, state.attempts
            assert state.lease_until is not None
            remaining = (state.lease_until - state.now).total_seconds()
            if waited + pause > _LOCAL_WAIT_SECONDS:
                return action, min(max(remaining, 1.0), _MAX_DEFER_SECONDS), state.attempts
            await asyncio.sleep(pause)
            waited += pause
            pause *= 2
        return ClaimAction.WAIT, 1.0, delivery.attempt

    async def _retry(
        self,
        delivery: Delivery,
        message: PriceChange,
        answer: ProviderAnswer,
        token: uuid.UUID,
        attempts: int,
        health: PartitionHealth,
    ) -> Outcome:
        settings = self.settings
        backoff = delay_seconds(
            settings.backoff,
            attempts - 1,
            settings.backoff_base_seconds,
            settings.backoff_max_seconds,
            self._rng,
        )
        wait = retry_delay(backoff, answer.retry_after, settings.backoff_max_seconds)
        error = answer.describe()
        parked = _failing_as_a_whole(health)
        if parked:
            await self.store.record_failure(message, token, attempts, answer.status, error)
            delivery.check_channel()
            # parked for its backoff, and released at once if the partition heals before
            await self._park(delivery, message, health.key, attempts, error, wait)
        else:
            # A partition may open while its retries wait in the delay backend, and heal before
            # they come back: a long backoff spends only a first hop there, then is checked.
            hop = wait
            if self.board.enabled:
                hop = min(wait, settings.breaker_max_break_seconds * _HOP_BREAKS)
            due = datetime.now(UTC) + timedelta(seconds=wait)
            retry = delivery.republish(
                attempts, error, settings.max_priority, None if hop >= wait else due
            )
            # its copy is kept until it is back, in the same statement (worker.overdue)
            await self.store.record_failure(
                message, token, attempts, answer.status, error, copy_of(retry, due)
            )
            delivery.check_channel()
            await self.delay.publish(retry, hop)
        RETRIES.labels(str(attempts)).inc()
        log.info(
            "retry_scheduled",
            idempotency_key=message.idempotency_key,
            attempt=attempts,
            outcome=Outcome.RETRY,
            delay=round(wait, 3),
            via="parking" if parked else "delay",
            error=error,
        )
        return Outcome.RETRY

    async def _dead(
        self,
        delivery: Delivery,
        message: PriceChange,
        reason: Outcome,
        error: str,
        answer: ProviderAnswer | None,
        token: uuid.UUID | None = None,
    ) -> Outcome:
        attempts = delivery.attempt + (answer is not None)
        raw = delivery.raw()
        if answer is not None and answer.sanitised:
            raw = dataclasses.replace(raw, sanitised=(*raw.sanitised, "last_error"))
        dead_id = await self.store.dead_letter(
            reason.value,
            raw,
            message,
            error,
            attempts=attempts,
            token=token,
            provider_status=None if answer is None else answer.status,
        )
        outcome = reason if dead_id is not None else Outcome.ALREADY_FINISHED
        log.warning(
            "dead_lettered",
            idempotency_key=message.idempotency_key,
            attempt=attempts,
            outcome=outcome,
            error=error,
            dead_letter=dead_id,
        )
        return outcome


def _failing_as_a_whole(health: PartitionHealth) -> bool:
    """Not one message's failure: the partition is open, or has failed twice in a row."""
    return health.state is not State.CLOSED or health.held or health.consecutive_failures >= 2
