"""One log stream: real `worker run` and `worker migrate` processes, their stdout and stderr
pipes (not a terminal), and every line that comes out of them is one JSON object with the
event, level, logger name and timestamp, the libraries' records (aiormq, Alembic) included."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

from worker.tooling.fleet import free_port, worker_command

FIELDS = {"event", "level", "logger", "timestamp"}


def worker_env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WORKER_")}
    env.update({f"WORKER_{name.upper()}": value for name, value in settings.items()})
    return env


def json_lines(stream: str, text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{stream}: not a JSON line: {line!r}") from None
        assert isinstance(event, dict), line
        assert event.keys() >= FIELDS, line
        events.append(event)
    return events


async def _run_until(env: dict[str, str], wanted: set[str], seen: int = 2) -> tuple[str, str]:
    """`worker run` until each of ``wanted`` (logger names) has logged ``seen`` lines; SIGTERM."""
    process = await asyncio.create_subprocess_exec(
        *worker_command("run"),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    out: list[str] = []
    counts = dict.fromkeys(wanted, 0)
    try:
        async with asyncio.timeout(30):
            while min(counts.values()) < seen:
                line = (await process.stdout.readline()).decode()
                assert line, f"worker run ended early: {''.join(out)}"
                out.append(line)
                logger = json.loads(line).get("logger")
                if logger in counts:
                    counts[logger] += 1
    finally:
        process.send_signal(signal.SIGTERM)
        rest, err = await process.communicate()
    assert process.returncode == 0, err
    return "".join(out) + rest.decode(), err.decode()


async def test_a_replica_without_broker_and_database_prints_only_json_lines() -> None:
    env = worker_env(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none",
        provider_url=f"http://127.0.0.1:{free_port()}",
        metrics_port=str(free_port()),
    )
    out, err = await _run_until(env, {"worker.replica"})
    events = json_lines("stdout", out) + json_lines("stderr", err)
    assert err == "", "one stream: stdout"
    assert [e["event"] for e in events].count("database_unreachable") >= 2
    assert events[-1]["event"] == "stopped"


async def test_the_broker_library_s_records_are_json_lines_too(database_url: str) -> None:
    """With the database up, the replica tries the broker: aiormq logs each failed attempt."""
    env = worker_env(
        amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        database_url=database_url,
        provider_url=f"http://127.0.0.1:{free_port()}",
        metrics_port=str(free_port()),
    )
    out, err = await _run_until(env, {"worker.replica", "aiormq.connection"})
    events = json_lines("stdout", out) + json_lines("stderr", err)
    assert err == ""
    library = [e for e in events if e["logger"] == "aiormq.connection"]
    assert library
    assert all(e["level"] == "error" for e in library)
    assert any(e["event"] == "broker_unreachable" for e in events)


async def test_migrate_logs_alembic_through_the_same_pipeline(empty_database_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *worker_command("migrate"),
        env=worker_env(database_url=empty_database_url, log_format="json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err
    assert err == b""
    events = json_lines("stdout", out.decode())
    upgrades = [e for e in events if e["event"].startswith("Running upgrade")]
    assert upgrades
    assert {e["logger"] for e in upgrades} == {"alembic.runtime.migration"}
    assert events[-1]["event"] == "migrated"
    assert events[-1]["logger"] == "worker.migrate"


async def test_a_bad_setting_is_one_json_line_when_not_on_a_terminal() -> None:
    process = await asyncio.create_subprocess_exec(
        *worker_command("run"),
        env=worker_env(concurrency="many"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 2
    assert err == b""
    (event,) = json_lines("stdout", out.decode())
    assert event["event"] == "configuration_error"
    assert event["error"].startswith("configuration error: WORKER_CONCURRENCY")
