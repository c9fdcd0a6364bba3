"""Celery's version of the delivery: kombu on RabbitMQ, late acks, automatic retries.

Run as Celery's docs say for I/O-bound tasks, one process per ``celery worker`` with the
thread pool: ``celery -A bench.peers.celery_app worker --pool threads --concurrency 16`` (twice).
``acks_late`` with a prefetch multiplier of 1 (the docs' advice for late acks);
``autoretry_for`` with ``retry_backoff`` (base), ``retry_backoff_max`` (cap) and
``retry_jitter``: the retried task is published again with an ETA and held by a worker until due.
"""

from __future__ import annotations

import requests
from celery import Celery

from bench.peers import common

app = Celery("bench", broker=common.AMQP_URL)
app.conf.update(
    task_default_queue=common.QUEUE,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
)


@app.task(  # type: ignore[untyped-decorator, unused-ignore]
    name="bench.peers.celery_app.deliver",
    acks_late=True,
    autoretry_for=(common.RetryableError, requests.RequestException),
    retry_backoff=int(common.BACKOFF_BASE_SECONDS),
    retry_backoff_max=int(common.BACKOFF_MAX_SECONDS),
    retry_jitter=True,
    max_retries=common.MAX_ATTEMPTS - 1,
)
def deliver(body: str) -> None:
    common.deliver(body)
