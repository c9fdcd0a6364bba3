"""WORKER_QUEUE_TYPE against queues that exist with another type: one line naming the setting
at start (exit 2 for `worker run`), not a channel error; on the machine's broker."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from worker.replica import Replica
from worker.settings import ConfigError

from .conftest import Harness


async def test_a_classic_queue_met_in_quorum_mode_is_refused_naming_the_setting(
    harness: Harness,
) -> None:
    await harness.start()  # classic: declares the classic queues
    await harness.stop()
    settings = harness.settings(queue_type="quorum")
    with pytest.raises(ConfigError) as raised:
        await asyncio.wait_for(Replica(settings).run(asyncio.Event()), 30)
    line = str(raised.value)
    assert line.startswith("WORKER_QUEUE_TYPE: queue ")
    assert "exists as a classic queue" in line
    assert "declares quorum queues" in line
    assert "\n" not in line


async def test_worker_run_exits_2_with_one_line(harness: Harness) -> None:
    settings = await harness.start()
    await harness.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")} | {
        "WORKER_AMQP_URL": settings.amqp_url,
        "WORKER_DATABASE_URL": settings.database_url,
        "WORKER_PROVIDER_URL": str(settings.provider_url),
        "WORKER_QUEUE": settings.queue,
        "WORKER_SOURCE_EXCHANGE": settings.source_exchange,
        "WORKER_QUEUE_TYPE": "quorum",
        "WORKER_METRICS_PORT": "0",
        "WORKER_LOG_FORMAT": "console",  # a fatal error: one line on stderr
    }
    code = "import sys; from worker.cli import main; sys.exit(main(['run']))"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("worker: configuration error: WORKER_QUEUE_TYPE: queue ")
