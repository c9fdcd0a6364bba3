"""The provider client (SPEC §2): one pooled aiohttp session per process, one POST per send.

It never raises for what the provider does: every answer, timeout or connection error comes
back as a :class:`ProviderAnswer` for :func:`worker.decisions.classify` to judge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp

from worker.message import PriceChange
from worker.metrics import PROVIDER_LATENCY, status_class


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    status: int | None  # None: no HTTP answer (timeout, connection error)
    message_id: str | None = None
    retry_after: float | None = None
    error: str | None = None

    def describe(self) -> str:
        """Short text for ``x-last-error`` and ``last_error``."""
        if self.status is None:
            return self.error or "no answer"
        return f"HTTP {self.status}" + (f": {self.error}" if self.error else "")


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)


class ProviderClient:
    def __init__(self, base_url: str, timeout_seconds: float, max_connections: int) -> None:
        self._base_url = base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_seconds),
            connector=aiohttp.TCPConnector(limit=max_connections),
            raise_for_status=False,
        )

    async def close(self) -> None:
        await self._session.close()

    async def send(self, message: PriceChange) -> ProviderAnswer:
        started = time.perf_counter()
        answer = await self._post(message)
        PROVIDER_LATENCY.labels(status_class(answer.status)).observe(time.perf_counter() - started)
        return answer

    async def _post(self, message: PriceChange) -> ProviderAnswer:
        url = f"{self._base_url}/v1/notifications/{message.channel}"
        headers = {"Idempotency-Key": message.idempotency_key}
        try:
            async with self._session.post(
                url, json=message.provider_body(), headers=headers, allow_redirects=False
            ) as response:
                return await _read_answer(response)
        except TimeoutError:
            return ProviderAnswer(status=None, error="timeout")
        except aiohttp.ClientError as exc:
            return ProviderAnswer(status=None, error=f"{type(exc).__name__}: {exc}"[:200])


async def _read_answer(response: aiohttp.ClientResponse) -> ProviderAnswer:
    status = response.status
    if 200 <= status < 300 or status == 409:
        try:
            body = await response.json(content_type=None)
        except (ValueError, aiohttp.ContentTypeError):
            body = None
        message_id = body.get("id") if isinstance(body, dict) else None
        return ProviderAnswer(
            status=status, message_id=None if message_id is None else str(message_id)
        )
    text = (await response.text(errors="replace")).strip().replace("\n", " ")
    return ProviderAnswer(
        status=status,
        retry_after=parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC)),
        error=text[:200] or response.reason,
    )
