"""Configuration from the environment (SPEC §4, prefix ``WORKER_``), validated once at start.

A bad value stops the process with one line naming the variable; secrets (passwords in
URLs) are masked wherever settings are shown.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, HttpUrl, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.backoff import BackoffPolicy

ENV_PREFIX = "WORKER_"


class DelayBackendName(StrEnum):
    AUTO = "auto"
    PLUGIN = "plugin"
    TTL = "ttl"


class QueueType(StrEnum):
    CLASSIC = "classic"
    QUORUM = "quorum"


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line naming the variable."""


def parse_status_ranges(text: str) -> frozenset[int]:
    """``"408,425,429,500-599"`` → the set of those HTTP statuses."""
    statuses: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"{part!r} is not a status or a range like 500-599") from None
        if not 100 <= first <= last <= 599:
            raise ValueError(f"{part!r} is outside 100-599 or reversed")
        statuses.update(range(first, last + 1))
    return frozenset(statuses)


# Query parameters that carry a secret (libpq's and asyncpg's spelling).
_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})
# What asyncpg.connect (and SQLAlchemy's asyncpg dialect) take from the URL's query. Anything
# else would reach asyncpg.connect as an unknown argument: a TypeError at the first connect.
_ASYNCPG_PARAMETERS = frozenset(
    {
        "ssl", "host", "port", "user", "password", "passfile", "database", "timeout",
        "command_timeout", "statement_cache_size", "max_cached_statement_lifetime",
        "max_cacheable_statement_size", "direct_tls", "target_session_attrs", "krbsrvname",
        "gsslib", "prepared_statement_cache_size",
    }
)  # fmt: skip
# libpq's certificate parameters, which asyncpg reads from the environment instead.
_LIBPQ_FROM_ENVIRONMENT = {
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
}
# The delay cascade's routing keys are 28 binary words ("0.1.…", 56 bytes) before the queue
# name, and AMQP caps a routing key at 255 bytes.
_DELAY_ROUTING_PREFIX_BYTES = 56
MAX_QUEUE_BYTES = 255 - _DELAY_ROUTING_PREFIX_BYTES


def mask_url(url: str) -> str:
    """Hide the password of a URL (in its user info or its query, as ``?password=``) so that
    it can be logged; hide all of an unreadable one.

    A comma-separated list of URLs (``WORKER_AMQP_URL`` of a cluster) is masked URL by URL.
    """
    if "," in url:
        return ",".join(mask_url(part.strip()) for part in url.split(","))
    try:
        parts = urlsplit(url)
        password = parts.password
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return "<unreadable URL>"
    if any(k.lower() in _SECRET_PARAMETERS for k, _ in query):
        masked = [(k, "***" if k.lower() in _SECRET_PARAMETERS else v) for k, v in query]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    if password is not None:
        netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


class Settings(BaseSettings):
    """Every knob of the worker. Field names are the variable names without the prefix."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    amqp_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/",
        description="RabbitMQ URL, or a comma-separated list of a cluster's nodes' URLs",
    )
    database_url: str = Field(
        "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres",
        description="PostgreSQL URL (SQLAlchemy form, asyncpg driver)",
    )
    provider_url: HttpUrl | None = Field(
        None,
        description="Provider base URL (POST {url}/v1/notifications/{channel}); required for run",
    )
    source_exchange: str = Field(
        "price-change",
        min_length=1,
        description="Topic exchange market data publishes to; declared durable if missing",
    )
    source_binding: str = Field(
        "#", min_length=1, description="Binding key of the ingress queue on the source exchange"
    )
    queue: str = Field(
        "notifications.work",
        min_length=1,
        max_length=MAX_QUEUE_BYTES,
        description="Work queue; names the ingress, retry and delay queues and exchanges too",
    )
    concurrency: int = Field(
        16,
        ge=1,
        le=1000,
        description="Messages in flight per replica (fresh ones prefetched: twice this)",
    )
    max_priority: int = Field(10, ge=1, le=255, description="x-max-priority of the work queue")
    queue_type: QueueType = Field(
        QueueType.CLASSIC,
        description="classic (one node) or quorum (replicated; one work queue per attempt)",
    )
    delivery_limit: int = Field(
        1000,
        ge=1,
        description="quorum: x-delivery-limit; returned this often, a message moves to .limit",
    )
    max_attempts: int = Field(
        10,
        ge=1,
        le=1000,
        description="Provider attempts before a retryable failure ends `exhausted`",
    )
    max_age_seconds: float = Field(
        86400, gt=0, description="Older messages (by occurred_at) end as `expired`, unsent"
    )
    backoff: BackoffPolicy = Field(
        BackoffPolicy.EXPONENTIAL_JITTER, description="Retry delay policy"
    )
    backoff_base_seconds: float = Field(
        5.0, ge=0, description="First retry delay (the policy's base)"
    )
    backoff_max_seconds: float = Field(3600.0, gt=0, description="Cap of any retry delay")
    delay_backend: DelayBackendName = Field(
        DelayBackendName.AUTO, description="Delay mechanism: ttl (plugin-free), plugin, or auto"
    )
    retry_statuses: Annotated[frozenset[int], NoDecode] = Field(
        parse_status_ranges("408,425,429,500-599"),
        description="Provider statuses that are retried",
    )
    max_body_bytes: int = Field(
        65536, ge=1024, description="Larger bodies are dead-lettered `invalid` unparsed"
    )
    provider_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="Timeout of one provider request"
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="After SIGTERM, how long in-flight messages may finish"
    )
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="Port of /metrics, /healthz and /readyz; 0 = off"
    )
    partition_fields: Annotated[tuple[str, ...], NoDecode] = Field(
        ("channel", "audience"),
        description="Message fields whose values form a provider partition, comma-separated "
        "(of ticker, channel, audience): its health is tracked, and its messages parked "
        "while it is open",
    )
    breaker_failures: int = Field(
        5,
        ge=0,
        le=1000,
        description="Transient failures in a row that open a partition (Envoy's and Finagle's "
        "5); 0 turns partition health off: every retry waits out its backoff in the delay backend",
    )
    breaker_break_seconds: float = Field(
        0.5,
        gt=0,
        le=3600,
        description="First break of an open partition before it is probed; doubles with each "
        "trip in a row, jittered; also the fleet's probe spacing in a provider-wide outage",
    )
    breaker_max_break_seconds: float = Field(
        1.0,
        gt=0,
        le=86400,
        description="Cap of a partition's break: how late, at most, a healed partition is noticed",
    )
    breaker_fresh_probe_seconds: float = Field(
        0.2,
        ge=0,
        le=3600,
        description="A first attempt (fresh message, replay) of an open partition probes it if "
        "no probe was made for this long, break or not: how late, at most, fresh alerts resume "
        "after a recovery; at most one call per this time per open partition (fleet-wide in a "
        "provider-wide outage); 0: first attempts wait for the break like the rest",
    )
    retry_overdue_seconds: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="A retry sent to the delay backend and not back this long after its "
        "backoff ended, its key still pending while the work queues are empty, is republished "
        "from PostgreSQL (the broker stalled or lost its hop); at most once per this time",
    )
    log_format: LogFormat = Field(LogFormat.AUTO, description="json, console, or auto (tty)")
    log_level: str = Field(
        "info",
        pattern=r"^(debug|info|warning|error)$",
        description="Log level: debug, info, warning or error",
    )

    @field_validator("retry_statuses", mode="before")
    @classmethod
    def _parse_statuses(cls, value: object) -> object:
        return parse_status_ranges(value) if isinstance(value, str) else value

    @field_validator("partition_fields", mode="before")
    @classmethod
    def _parse_fields(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        fields = tuple(part.strip() for part in value.split(",") if part.strip())
        allowed = ("ticker", "channel", "audience")
        unknown = [name for name in fields if name not in allowed]
        if not fields or unknown or len(set(fields)) != len(fields):
            raise ValueError(f"must be distinct names among {', '.join(allowed)}")
        return fields

    @field_validator("breaker_max_break_seconds")
    @classmethod
    def _break_cap(cls, value: float, info: ValidationInfo) -> float:
        base = info.data.get("breaker_break_seconds")
        if base is not None and value < base:
            raise ValueError(f"must not be below {ENV_PREFIX}BREAKER_BREAK_SECONDS ({base})")
        return value

    @field_validator("queue")
    @classmethod
    def _routable_queue(cls, value: str) -> str:
        size = len(value.encode())
        if size > MAX_QUEUE_BYTES:
            raise ValueError(
                f"is {size} bytes; at most {MAX_QUEUE_BYTES}, so that a retry's routing key "
                "(the delay in 28 binary words, then the queue) fits AMQP's 255 bytes"
            )
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: str) -> str:
        urls = [part.strip() for part in value.split(",")]
        if any(urlsplit(url).scheme not in {"amqp", "amqps"} for url in urls):
            raise ValueError("must be an amqp:// or amqps:// URL, or a comma-separated list")
        return ",".join(urls)

    @property
    def amqp_urls(self) -> list[str]:
        """The broker's node URLs, in the order to try them."""
        return self.amqp_url.split(",")

    @property
    def attempt_queues(self) -> int:
        """How many work queues stand in for the priorities (quorum mode; classic: one).

        One per attempt a message can come back with (0 … max_attempts − 1), as the classic
        work queue's priorities tell apart ``max_priority + 1`` of them; attempts beyond the
        last share its queue, as they share priority 0 in classic mode.
        """
        if self.queue_type is QueueType.CLASSIC:
            return 1
        return min(self.max_attempts, self.max_priority + 1)

    @field_validator("database_url")
    @classmethod
    def _asyncpg_driver(cls, value: str) -> str:
        """The asyncpg form of a libpq-style URL: driver in the scheme, ``sslmode`` → ``ssl``.

        SQLAlchemy hands the query to ``asyncpg.connect`` as arguments, and asyncpg spells
        libpq's ``sslmode`` as ``ssl`` (same values: disable … verify-full).
        """
        parts = urlsplit(value)
        if parts.scheme in {"postgresql", "postgres"}:
            parts = parts._replace(scheme="postgresql+asyncpg")
        elif parts.scheme != "postgresql+asyncpg":
            raise ValueError("must be a postgresql:// or postgresql+asyncpg:// URL")
        try:
            parts.port  # noqa: B018 — raises for a port that is not a number in 0-65535
        except ValueError as exc:
            raise ValueError(f"has a bad port: {exc}") from None
        query = [("ssl" if k == "sslmode" else k, v) for k, v in parse_qsl(parts.query)]
        for key, _ in query:
            if key in _LIBPQ_FROM_ENVIRONMENT:
                raise ValueError(
                    f"{key}= is libpq's; the asyncpg driver reads it from the environment: "
                    f"set {_LIBPQ_FROM_ENVIRONMENT[key]} instead"
                )
            if key not in _ASYNCPG_PARAMETERS:
                raise ValueError(f"{key}= is not a connection parameter the asyncpg driver takes")
        return urlunsplit(parts._replace(query=urlencode(query)))

    @property
    def lease_seconds(self) -> float:
        """How long a claim on a topic key lasts: outlives a provider call with margin."""
        return 2 * self.provider_timeout_seconds + 5

    def require_provider_url(self) -> str:
        if self.provider_url is None:
            raise ConfigError(f"{ENV_PREFIX}PROVIDER_URL: required to run the worker")
        return str(self.provider_url).rstrip("/")

    def safe_dump(self) -> dict[str, Any]:
        """The settings as loggable values, secrets masked."""
        data = self.model_dump(mode="json")
        data["amqp_url"] = mask_url(self.amqp_url)
        data["database_url"] = mask_url(self.database_url)
        if self.provider_url is not None:
            data["provider_url"] = mask_url(str(self.provider_url))
        data["retry_statuses"] = len(self.retry_statuses)
        return data


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; turn a validation failure into one :class:`ConfigError` line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = f"{ENV_PREFIX}{str(error['loc'][0]).upper()}" if error["loc"] else ENV_PREFIX
        given = error.get("input")
        shown = mask_url(given) if isinstance(given, str) else given
        raise ConfigError(f"{name}: {error['msg']} (got {shown!r})") from None
