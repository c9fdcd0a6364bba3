"""The peers: the same delivery written for Dramatiq and for Celery, as their docs recommend.

Both make the worker's provider call (``POST /v1/notifications/{channel}``, the same JSON body,
the same ``Idempotency-Key``, computed with ``worker.message.parse_message``) and retry what
the worker retries (408, 425, 429, 5xx, no answer) with the worker's retry limit, backoff base
and cap. They record nothing in PostgreSQL: no claim, no topic ordering, no dead-letter table.
Configured from the environment (``BENCH_*``, see ``bench.peers.common``).
"""
