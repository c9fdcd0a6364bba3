"""SPEC §4: configuration from the environment, validated once, secrets masked."""

from __future__ import annotations

import json
import os
import traceback

import pytest

from worker.backoff import BackoffPolicy
from worker.settings import (
    ConfigError,
    DelayBackendName,
    Settings,
    load_settings,
    mask_url,
    parse_status_ranges,
)

SPEC_RETRY_STATUSES = frozenset({408, 425, 429, *range(500, 600)})
SECRET = "s3cr3t-Pa55"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No WORKER_ variable of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("WORKER_"):
            monkeypatch.delenv(name)


def _config_error(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> ConfigError:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    return caught.value


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_match_spec() -> None:
    settings = load_settings()
    assert settings.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.database_url == "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    assert settings.provider_url is None
    assert settings.source_exchange == "price-change"
    assert settings.source_binding == "#"
    assert settings.queue == "notifications.work"
    assert settings.concurrency >= 1
    assert settings.max_priority == 10
    assert settings.max_attempts == 10
    assert settings.max_age_seconds == 86400
    assert settings.backoff is BackoffPolicy.EXPONENTIAL_JITTER
    assert settings.backoff_base_seconds >= 0
    assert settings.backoff_max_seconds > 0
    assert settings.delay_backend is DelayBackendName.AUTO
    assert settings.retry_statuses == SPEC_RETRY_STATUSES
    assert settings.provider_timeout_seconds == 10
    assert settings.shutdown_grace_seconds >= 0
    assert 0 <= settings.metrics_port <= 65535


def test_lease_outlives_a_provider_call() -> None:
    assert load_settings().lease_seconds == 25
    settings = load_settings(provider_timeout_seconds=3)
    assert settings.lease_seconds == 11
    assert settings.lease_seconds > settings.provider_timeout_seconds


# --- reading the environment ------------------------------------------------------------------


def test_environment_is_read_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CONCURRENCY", "4")
    monkeypatch.setenv("WORKER_MAX_PRIORITY", "5")
    monkeypatch.setenv("WORKER_QUEUE", "alerts.work")
    monkeypatch.setenv("WORKER_BACKOFF", "linear")
    monkeypatch.setenv("WORKER_DELAY_BACKEND", "ttl")
    monkeypatch.setenv("WORKER_METRICS_PORT", "0")
    monkeypatch.setenv("WORKER_AMQP_URL", "amqps://user:pw@rabbit.example:5671/vhost")
    monkeypatch.setenv("CONCURRENCY", "999")  # no prefix: ignored
    settings = load_settings()
    assert settings.concurrency == 4
    assert settings.max_priority == 5
    assert settings.queue == "alerts.work"
    assert settings.backoff is BackoffPolicy.LINEAR
    assert settings.delay_backend is DelayBackendName.TTL
    assert settings.metrics_port == 0
    assert settings.amqp_url == "amqps://user:pw@rabbit.example:5671/vhost"


def test_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CONCURRENCY", "4")
    assert load_settings(concurrency=7).concurrency == 7


def test_retry_statuses_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_RETRY_STATUSES", "403,500-503")
    assert load_settings().retry_statuses == frozenset({403, 500, 501, 502, 503})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("408,425,429,500-599", SPEC_RETRY_STATUSES),
        ("403,500-503", frozenset({403, 500, 501, 502, 503})),
        (" 403 , 500-501 ", frozenset({403, 500, 501})),
        ("429", frozenset({429})),
        ("500-500", frozenset({500})),
        ("100-599", frozenset(range(100, 600))),
        ("429,429,420-430", frozenset(range(420, 431))),
        ("503,,", frozenset({503})),
        ("", frozenset()),
    ],
)
def test_parse_status_ranges(value: str, expected: frozenset[int]) -> None:
    assert parse_status_ranges(value) == expected


@pytest.mark.parametrize("value", ["abc", "600", "599-500", "99", "500-600", "5xx", "-5", "4.29"])
def test_parse_status_ranges_rejects(value: str) -> None:
    with pytest.raises(ValueError, match=r"500-599|100-599"):
        parse_status_ranges(value)


@pytest.mark.parametrize("value", ["abc", "600", "599-500", "408,abc"])
def test_bad_retry_statuses_is_one_line_config_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    error = _config_error(monkeypatch, "WORKER_RETRY_STATUSES", value)
    assert str(error).startswith("WORKER_RETRY_STATUSES:")
    assert "\n" not in str(error)


def test_database_url_postgresql_rewritten_to_asyncpg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_DATABASE_URL", "postgresql://app:pw@db.example:5432/notify")
    assert load_settings().database_url == "postgresql+asyncpg://app:pw@db.example:5432/notify"


@pytest.mark.parametrize(
    "url",
    [
        "postgres://app@db/notify",
        "postgresql://app@db/notify",
        "postgresql+asyncpg://app@db/notify",
    ],
)
def test_database_url_ends_with_asyncpg_driver(url: str) -> None:
    assert load_settings(database_url=url).database_url == "postgresql+asyncpg://app@db/notify"


# --- bad values: one line naming the variable -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WORKER_CONCURRENCY", "0"),
        ("WORKER_CONCURRENCY", "many"),
        ("WORKER_MAX_PRIORITY", "0"),
        ("WORKER_MAX_PRIORITY", "256"),
        ("WORKER_MAX_ATTEMPTS", "0"),
        ("WORKER_MAX_AGE_SECONDS", "0"),
        ("WORKER_BACKOFF", "fibonacci"),
        ("WORKER_BACKOFF_BASE_SECONDS", "-1"),
        ("WORKER_BACKOFF_MAX_SECONDS", "0"),
        ("WORKER_DELAY_BACKEND", "redis"),
        ("WORKER_RETRY_STATUSES", "abc"),
        ("WORKER_PROVIDER_TIMEOUT_SECONDS", "0"),
        ("WORKER_SHUTDOWN_GRACE_SECONDS", "-1"),
        ("WORKER_METRICS_PORT", "70000"),
        ("WORKER_PROVIDER_URL", "not a url"),
        ("WORKER_PROVIDER_URL", "ftp://provider.example/"),
        ("WORKER_AMQP_URL", "http://rabbit.example/"),
        ("WORKER_AMQP_URL", "rabbit.example:5672"),
        ("WORKER_DATABASE_URL", "mysql://db.example/notify"),
        ("WORKER_DATABASE_URL", "sqlite:///x.db"),
        ("WORKER_QUEUE", ""),
        ("WORKER_LOG_LEVEL", "verbose"),
        ("WORKER_LOG_FORMAT", "xml"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    error = _config_error(monkeypatch, name, value)
    text = str(error)
    assert text.startswith(f"{name}:")
    assert "\n" not in text
    assert error.__suppress_context__  # no pydantic traceback chained to the one line


def test_bad_value_names_variable_with_overrides() -> None:
    with pytest.raises(ConfigError, match=r"^WORKER_CONCURRENCY:"):
        load_settings(concurrency=0)


# --- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        (f"amqps://user:{SECRET}@rabbit.example/vh", "amqps://user:***@rabbit.example/vh"),
        (f"postgresql+asyncpg://app:{SECRET}@db/x", "postgresql+asyncpg://app:***@db/x"),
        (f"amqp://:{SECRET}@rabbit.example/", "amqp://:***@rabbit.example/"),
        ("amqp://user:p@ss@rabbit.example/", "amqp://user:***@rabbit.example/"),
        ("amqp://user@rabbit.example/", "amqp://user@rabbit.example/"),
        ("amqp://rabbit.example/", "amqp://rabbit.example/"),
    ],
)
def test_mask_url(url: str, expected: str) -> None:
    assert mask_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [f"http://guest:{SECRET}@rabbit.example:5672/", f"rabbit://guest:{SECRET}@rabbit.example/"],
)
def test_amqp_password_not_in_config_error(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    error = _config_error(monkeypatch, "WORKER_AMQP_URL", url)
    assert str(error).startswith("WORKER_AMQP_URL:")
    assert SECRET not in str(error)
    assert SECRET not in "".join(traceback.format_exception(error))


def test_database_password_not_in_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    error = _config_error(monkeypatch, "WORKER_DATABASE_URL", f"mysql://app:{SECRET}@db/x")
    assert str(error).startswith("WORKER_DATABASE_URL:")
    assert SECRET not in str(error)


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("WORKER_AMQP_URL", f"amqp://guest:{SECRET}@[::1/"),
        ("WORKER_DATABASE_URL", f"postgresql://app:{SECRET}@[::1/x"),
    ],
)
def test_malformed_url_is_config_error_without_password(
    monkeypatch: pytest.MonkeyPatch, name: str, url: str
) -> None:
    monkeypatch.setenv(name, url)
    with pytest.raises((ConfigError, ValueError)) as caught:
        load_settings()
    assert SECRET not in "".join(traceback.format_exception(caught.value))
    assert isinstance(caught.value, ConfigError)
    assert str(caught.value).startswith(f"{name}:")


def test_safe_dump_masks_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_AMQP_URL", f"amqp://guest:{SECRET}@rabbit.example:5672/")
    monkeypatch.setenv("WORKER_DATABASE_URL", f"postgresql://app:{SECRET}@db.example/notify")
    settings = load_settings()
    assert SECRET in settings.amqp_url  # the real value is still there to connect with
    dump = settings.safe_dump()
    assert SECRET not in json.dumps(dump)
    assert dump["amqp_url"] == "amqp://guest:***@rabbit.example:5672/"
    assert dump["database_url"] == "postgresql+asyncpg://app:***@db.example/notify"


def test_safe_dump_is_json_and_complete() -> None:
    dump = load_settings().safe_dump()
    json.dumps(dump)
    assert set(dump) == set(Settings.model_fields)
    assert dump["retry_statuses"] == len(SPEC_RETRY_STATUSES)
    assert dump["backoff"] == "exponential_jitter"


def test_safe_dump_masks_provider_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_PROVIDER_URL", f"https://api:{SECRET}@provider.example/")
    assert SECRET not in json.dumps(load_settings().safe_dump())


# --- the provider URL -------------------------------------------------------------------------


def test_require_provider_url_missing() -> None:
    with pytest.raises(ConfigError, match=r"^WORKER_PROVIDER_URL:"):
        load_settings().require_provider_url()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://provider:8080", "http://provider:8080"),
        ("http://provider:8080/", "http://provider:8080"),
        ("https://provider.example/api/", "https://provider.example/api"),
    ],
)
def test_require_provider_url(monkeypatch: pytest.MonkeyPatch, url: str, expected: str) -> None:
    monkeypatch.setenv("WORKER_PROVIDER_URL", url)
    assert load_settings().require_provider_url() == expected


# --- issue 10: URLs and names that used to fail at run time ------------------------------------


def test_a_password_in_the_database_url_query_is_masked() -> None:
    settings = load_settings(database_url="postgresql://app@db/notify?password=hunter2&ssl=require")
    dumped = settings.safe_dump()["database_url"]
    assert "hunter2" not in dumped
    assert "password=***" in dumped


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("postgresql://app@db:99999/notify", "bad port"),
        ("postgresql://app@db:port/notify", "bad port"),
        ("postgresql://app@db/notify?sslrootcert=/etc/ca.pem", "PGSSLROOTCERT"),
        ("postgresql://app@db/notify?bogus=1", "bogus= is not"),
    ],
)
def test_a_database_url_asyncpg_cannot_use_is_one_line(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="WORKER_DATABASE_URL") as raised:
        load_settings(database_url=url)
    assert fragment in str(raised.value)
    assert "\n" not in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_a_queue_whose_retry_routing_key_would_exceed_255_bytes_is_refused() -> None:
    assert load_settings(queue="q" * 199).queue == "q" * 199
    with pytest.raises(ConfigError, match="WORKER_QUEUE"):
        load_settings(queue="q" * 200)
    with pytest.raises(ConfigError, match="255 bytes"):
        load_settings(queue="é" * 100)  # 200 bytes


def test_the_longest_queue_makes_a_routing_key_of_exactly_255_bytes() -> None:
    from worker.delay import MAX_DELAY_SECONDS, delay_routing_key
    from worker.settings import MAX_QUEUE_BYTES

    assert len(delay_routing_key(MAX_DELAY_SECONDS, "q" * MAX_QUEUE_BYTES).encode()) == 255
