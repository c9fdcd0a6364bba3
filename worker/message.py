"""The input message (SPEC §1): validation, the idempotency key and the topic key.

Parsing is pure: it takes the raw body and the current time and either returns a
:class:`PriceChange` or raises :class:`InvalidMessage` with a short reason, and nothing else,
whatever the bytes (a property test holds it to that).

Which characters make a body invalid: a NUL (U+0000) or a surrogate code point (``"\ud800"``,
legal JSON but not Unicode text) in any string of the body, known field or unknown, key or
value. PostgreSQL stores neither in jsonb, and a surrogate cannot be encoded as UTF-8 for the
provider, so such a message could be neither recorded nor sent faithfully. Every other
character (other control characters, bidi marks, private use, non-characters) is sendable: it
is stored as it came and JSON-escaped for the provider.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from worker.errors import describe_error
from worker.storable import dumps, has_unstorable

MAX_FUTURE_SKEW = timedelta(minutes=5)
_MAX_PRICE_EXPONENT = 30  # prices between 1e-30 and 1e31: no exotic exponents
_MAX_PRICE_DIGITS = 64
# Nesting deeper than this (in unknown fields) is refused: jsonb and every reader stay safe.
MAX_NESTING = 32
# RFC 3339 §5.6 date-time (T or space, Z or ±hh:mm; case-insensitive), stricter than ISO 8601.
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)


def _sane_price(value: Decimal) -> Decimal:
    if not -_MAX_PRICE_EXPONENT <= value.adjusted() <= _MAX_PRICE_EXPONENT:
        raise ValueError(
            f"must be between 1e-{_MAX_PRICE_EXPONENT} and 1e{_MAX_PRICE_EXPONENT + 1}"
        )
    if len(value.as_tuple().digits) > _MAX_PRICE_DIGITS:
        raise ValueError(f"must have at most {_MAX_PRICE_DIGITS} digits")
    return value


PositiveDecimal = Annotated[Decimal, Field(gt=0, allow_inf_nan=False), AfterValidator(_sane_price)]


class InvalidMessage(ValueError):
    """The body is not JSON or breaks a rule of SPEC §1."""


def normalise_decimal(value: Decimal) -> str:
    """``189.10`` → ``189.1``, ``100`` → ``100``: no exponent, no trailing zeros, never rounded."""
    exact = Context(prec=max(len(value.as_tuple().digits), 1), Emax=MAX_EMAX, Emin=MIN_EMIN)
    return format(value.normalize(exact), "f")


def format_timestamp(value: datetime) -> str:
    """UTC, microseconds, ``Z``: the form used in the idempotency key and sent to the provider.

    Four-digit years always (``strftime("%Y")`` writes year 1 as ``1``)."""
    utc = value.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


class PriceChange(BaseModel):
    """A validated "price changed" event. Unknown fields are kept in ``model_extra``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    ticker: Annotated[str, Field(pattern=r"^[A-Z0-9.\-]{1,16}$")]
    price: PositiveDecimal
    previous_price: PositiveDecimal | None = None
    occurred_at: datetime
    channel: Literal["email", "sms"]
    audience: Annotated[str, Field(pattern=r"^[a-z0-9_\-]{1,64}$")]
    text: Annotated[str, Field(max_length=1000)] | None = None

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _rfc3339_with_offset(cls, value: object) -> datetime:
        if not isinstance(value, str) or not _RFC3339.match(value):
            raise ValueError("must be an RFC 3339 timestamp with a UTC offset")
        try:
            parsed = datetime.fromisoformat(value.upper())
        except ValueError as exc:
            raise ValueError(f"must be a real date and time: {exc}") from exc
        try:  # 0001-01-01T00:00:00+01:00 is a real time, but before the first UTC one
            parsed.astimezone(UTC)
        except OverflowError:
            raise ValueError("is outside the years 1 to 9999 in UTC") from None
        return parsed

    @cached_property
    def price_text(self) -> str:
        return normalise_decimal(self.price)

    @cached_property
    def occurred_at_text(self) -> str:
        return format_timestamp(self.occurred_at)

    @cached_property
    def idempotency_key(self) -> str:
        raw = "|".join(
            (self.ticker, self.price_text, self.occurred_at_text, self.channel, self.audience)
        )
        return hashlib.sha256(raw.encode()).hexdigest()

    @cached_property
    def topic_key(self) -> str:
        return f"{self.ticker}|{self.channel}|{self.audience}"

    def provider_body(self) -> dict[str, Any]:
        """The JSON body of the provider call (SPEC §2)."""
        return {
            "idempotency_key": self.idempotency_key,
            "ticker": self.ticker,
            "price": self.price_text,
            "previous_price": (
                None if self.previous_price is None else normalise_decimal(self.previous_price)
            ),
            "occurred_at": self.occurred_at_text,
            "audience": self.audience,
            "text": self.text,
        }

    def stored_payload(self) -> dict[str, Any]:
        """What ``deliveries.payload`` keeps: the normalised fields plus every unknown field."""
        return {**(self.model_extra or {}), **self.provider_body(), "channel": self.channel}

    @cached_property
    def provider_json(self) -> bytes:
        """:meth:`provider_body` encoded once, for every attempt of this delivery."""
        return json.dumps(self.provider_body(), separators=(",", ":")).encode()

    @cached_property
    def stored_payload_json(self) -> str:
        """:meth:`stored_payload` as the jsonb text the claim stores."""
        return dumps(self.stored_payload())


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def parse_message(
    body: bytes,
    now: datetime,
    *,
    content_type: str | None = None,
    max_bytes: int | None = None,
) -> PriceChange:
    """Validate a raw body. Decimals are parsed exactly, never through a float.

    A body over ``max_bytes`` is refused unparsed; a content type other than JSON is refused
    (an absent one is tolerated). Raises :class:`InvalidMessage` and nothing else.
    """
    try:
        return _parse(body, now, content_type, max_bytes)
    except InvalidMessage:
        raise
    except Exception as exc:
        raise InvalidMessage(f"unreadable: {describe_error(exc, 200)}") from exc


def _parse(
    body: bytes, now: datetime, content_type: str | None, max_bytes: int | None
) -> PriceChange:
    if max_bytes is not None and len(body) > max_bytes:
        raise InvalidMessage(f"body of {len(body)} bytes exceeds the limit of {max_bytes}")
    if content_type and content_type.split(";")[0].strip().lower() != "application/json":
        raise InvalidMessage(f"content type {content_type[:100]!r} is not application/json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not UTF-8: {exc}") from exc
    try:
        data = json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidMessage(f"not JSON: nested deeper than {MAX_NESTING}") from None
    except ValueError as exc:
        raise InvalidMessage(f"not JSON: {str(exc)[:200]}") from exc
    if not isinstance(data, dict):
        raise InvalidMessage(f"expected a JSON object, got {type(data).__name__}")
    _check_strings(data)
    try:
        message = PriceChange.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidMessage(f"{where[:100]}: {first['msg'][:200]}") from exc
    if message.occurred_at - now > MAX_FUTURE_SKEW:
        raise InvalidMessage("occurred_at: more than 5 minutes in the future")
    # computed here, so that nothing about the key can fail later
    message.idempotency_key  # noqa: B018
    message.stored_payload_json  # noqa: B018
    return message


def _check_strings(data: dict[str, Any]) -> None:
    """No NUL or surrogate in any key or string, no nesting deeper than MAX_NESTING."""
    pending: list[tuple[object, int, str]] = [(data, 1, "body")]
    while pending:
        value, depth, where = pending.pop()
        if depth > MAX_NESTING:
            raise InvalidMessage(f"{where}: nested deeper than {MAX_NESTING}")
        if isinstance(value, dict):
            for key, item in value.items():
                if has_unstorable(key):
                    raise InvalidMessage(f"{where}: a field name holds U+0000 or a surrogate")
                pending.append((item, depth + 1, key[:50] if depth == 1 else where))
        elif isinstance(value, list):
            pending.extend((item, depth + 1, where) for item in value)
        elif isinstance(value, str) and has_unstorable(value):
            raise InvalidMessage(f"{where}: holds U+0000 or a surrogate code point")
