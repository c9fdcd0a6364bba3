"""The provider client (SPEC §2): one pooled aiohttp session per process, one POST per send.

It never raises for what the provider does: every answer, timeout or connection error comes
back as a :class:`ProviderAnswer` for :func:`worker.decisions.classify` to judge.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp

from worker.errors import describe_error
from worker.message import PriceChange
from worker.metrics import PROVIDER_LATENCY, status_class
from worker.storable import MAX_ID_CHARS, clean_text, decode_text, storable_text

# An answer's body is read up to this size: a 10 MB error page costs 64 KiB, not 10 MB.
MAX_ANSWER_BYTES = 65536
ERROR_CHARS = 200


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    status: int | None  # None: no HTTP answer (timeout, connection error)
    message_id: str | None = None
    retry_after: float | None = None
    error: str | None = None
    sanitised: bool = False  # the error text or the id was made storable (NUL, binary, size)

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
        return float(value) if len(value) <= 12 else None
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
        headers = {"Idempotency-Key": message.idempotency_key, "Content-Type": "application/json"}
        try:
            async with self._session.post(
                url, data=message.provider_json, headers=headers, allow_redirects=False
            ) as response:
                return await _read_answer(response)
        except TimeoutError:
            return ProviderAnswer(status=None, error="timeout")
        except aiohttp.ClientError as exc:
            return ProviderAnswer(status=None, error=clean_text(describe_error(exc), ERROR_CHARS))


async def read_limited(response: aiohttp.ClientResponse, limit: int = MAX_ANSWER_BYTES) -> bytes:
    """At most ``limit`` bytes of the body; the rest is never read (nor buffered)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def answer_id(body: bytes) -> tuple[str | None, bool]:
    """The ``id`` of a 2xx answer's JSON body as storable text (a NUL id is not lost), and
    whether it had to be changed for that."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None, False
    value = data.get("id") if isinstance(data, dict) else None
    if value is None:
        return None, False
    text = value if isinstance(value, str) else json.dumps(value)[:MAX_ID_CHARS]
    cleaned, changed = storable_text(text, MAX_ID_CHARS)
    return cleaned, changed


def error_text(body: bytes) -> tuple[str, bool]:
    """An error answer's body as one short line of storable text (a binary page included),
    and whether anything but whitespace had to be changed or cut for that."""
    text, changed = decode_text(body[: ERROR_CHARS * 4], ERROR_CHARS * 4)
    printable = "".join(c if c.isprintable() or c.isspace() else " " for c in text)
    line, cut = storable_text(" ".join(printable.split()), ERROR_CHARS)
    return line, changed or cut or printable != text


async def _read_answer(response: aiohttp.ClientResponse) -> ProviderAnswer:
    status = response.status
    try:
        body = await read_limited(response)
    except (aiohttp.ClientError, ValueError) as exc:
        body = b""
        if 200 <= status < 300 or status == 409:  # the status is what counts
            return ProviderAnswer(status=status)
        return ProviderAnswer(status=status, error=clean_text(describe_error(exc), ERROR_CHARS))
    if 200 <= status < 300 or status == 409:
        message_id, changed = answer_id(body)
        return ProviderAnswer(status=status, message_id=message_id, sanitised=changed)
    error, changed = error_text(body)
    return ProviderAnswer(
        status=status,
        retry_after=parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC)),
        error=error or clean_text(response.reason or "", ERROR_CHARS) or None,
        sanitised=changed,
    )
