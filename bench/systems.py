"""The systems under test, behind one interface: the worker and its two peers.

Each gets its own queue (and, for the worker, its own database) per run, is started as real
processes (``worker run`` ×2; ``dramatiq … --processes 2 --threads 16``; ``celery worker
--pool threads --concurrency 16`` ×2), reports which processes are its own (whole trees, so
Dramatiq's forked workers count) and how many messages it has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aio_pika
import psutil

from bench.lib import Provider, World, fresh_world, with_path
from bench.procs import tree
from worker.settings import load_settings
from worker.tooling.fleet import ReplicaProcess, recreate_database, stop_replicas
from worker.topology import declare_topology

PROCESSES = 2
THREADS = 16  # the worker's WORKER_CONCURRENCY, the peers' threads per process
SYSTEMS = ("worker", "dramatiq", "celery")  # the default set; "floor" on request
# the worker with partition health off, as it was before it: beside the worker where a
# scenario compares the two (Scenario.before_after)
UNPARTITIONED = "worker-unpartitioned"
ALL_SYSTEMS = (*SYSTEMS, UNPARTITIONED, "floor")


@dataclass(frozen=True)
class Retry:
    """The retry policy every system gets: attempts in all, backoff base and cap (seconds)."""

    max_attempts: int = 10
    base_s: float = 5
    cap_s: float = 3600

    def worker_env(self) -> dict[str, str]:
        return {
            "WORKER_BACKOFF": "exponential_jitter",
            "WORKER_MAX_ATTEMPTS": str(self.max_attempts),
            "WORKER_BACKOFF_BASE_SECONDS": f"{self.base_s:g}",
            "WORKER_BACKOFF_MAX_SECONDS": f"{self.cap_s:g}",
        }

    def peer_env(self) -> dict[str, str]:
        return {
            "BENCH_MAX_ATTEMPTS": str(self.max_attempts),
            "BENCH_BACKOFF_BASE_SECONDS": f"{self.base_s:g}",
            "BENCH_BACKOFF_MAX_SECONDS": f"{self.cap_s:g}",
        }


class System:
    """One system for one run: ``setup`` → (publish) → ``start`` → … → ``stop`` → ``teardown``."""

    name = ""
    fmt = ""  # the publisher's --format
    records = False  # records each delivery in PostgreSQL
    database: str | None = None

    def __init__(self, run: str, provider: Provider, retry: Retry, extra_env: dict[str, str]):
        self.run = run
        self.provider = provider
        self.retry = retry
        self.extra_env = extra_env
        self.amqp_url = load_settings().amqp_url
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"bench-{run}-{self.name}-"))

    @property
    def target(self) -> str:
        raise NotImplementedError

    async def setup(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    def root_pids(self) -> list[int]:
        raise NotImplementedError

    def processes(self) -> list[psutil.Process]:
        return [p for pid in self.root_pids() for p in tree(pid)]

    async def finished(self) -> int:
        """Messages done: the worker's finished keys; a peer's keys the provider accepted."""
        return int((await self.provider.stats())["accepted"])

    async def stop(self) -> None:
        raise NotImplementedError

    async def teardown(self) -> None:
        raise NotImplementedError


class Worker(System):
    name = "worker"
    fmt = "worker"
    records = True
    world: World
    replicas: list[ReplicaProcess]

    @property
    def target(self) -> str:
        return self.world.source_exchange

    async def setup(self) -> None:
        env = {"WORKER_CONCURRENCY": str(THREADS), **self.retry.worker_env(), **self.extra_env}
        self.world = await fresh_world(self.run, self.provider.url, **env)
        self.database = self.world.database
        settings = load_settings(
            queue=self.world.names.queue, source_exchange=self.world.source_exchange
        )
        async with await aio_pika.connect(self.amqp_url) as connection:
            await declare_topology(await connection.channel(), settings)
        self.replicas = []

    async def start(self) -> None:
        self.replicas = await self.world.start(PROCESSES)

    def root_pids(self) -> list[int]:
        return [r.pid for r in self.replicas if r.running]

    async def finished(self) -> int:
        return await self.world.count_finished()

    async def stop(self) -> None:
        await stop_replicas(self.replicas)

    async def teardown(self) -> None:
        await self.world.close()


class UnpartitionedWorker(Worker):
    name = UNPARTITIONED

    async def setup(self) -> None:
        self.extra_env = {**self.extra_env, "WORKER_BREAKER_FAILURES": "0"}
        await super().setup()


class _Peer(System):
    """A peer started as command lines, ready once its consumers are on the queue."""

    _processes: list[asyncio.subprocess.Process]
    _logs: list[IO[bytes]]
    consumers = PROCESSES  # on the queue once it is ready

    @property
    def target(self) -> str:
        return f"bench.{self.run}.{self.name}"

    def queue_arguments(self) -> dict[str, Any]:
        return {}

    def commands(self) -> list[list[str]]:
        raise NotImplementedError

    def extra_queues(self) -> Sequence[str]:
        return ()

    async def _delete(self) -> None:
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            for queue in (self.target, *self.extra_queues()):
                await channel.queue_delete(queue)
            await channel.exchange_delete(self.target)

    async def setup(self) -> None:
        await self._delete()
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            await channel.declare_queue(
                self.target, durable=True, arguments=self.queue_arguments() or None
            )
        self._processes = []
        self._logs = []

    async def start(self) -> None:
        env = {
            **os.environ,
            "BENCH_AMQP_URL": self.amqp_url,
            "BENCH_QUEUE": self.target,
            "BENCH_PROVIDER_URL": self.provider.url,
            **self.retry.peer_env(),
            **self.extra_env,
        }
        for number, command in enumerate(self.commands(), 1):
            log = (self.log_dir / f"{self.name}-{number}.log").open("ab")
            self._logs.append(log)
            self._processes.append(
                await asyncio.create_subprocess_exec(
                    *command, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
                )
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            while await self._consumers(channel) < self.consumers:
                for process in self._processes:
                    if process.returncode is not None:
                        raise RuntimeError(f"{self.name} exited; see {self.log_dir}")
                if loop.time() > deadline:
                    raise RuntimeError(f"{self.name} did not start consuming; see {self.log_dir}")
                await asyncio.sleep(0.1)

    async def _consumers(self, channel: aio_pika.abc.AbstractChannel) -> int:
        queue = await channel.declare_queue(self.target, passive=True)
        return int(queue.declaration_result.consumer_count or 0)

    def root_pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.returncode is None]

    async def stop(self) -> None:
        """After the measurement (nothing is left to do): SIGTERM, and SIGKILL to the process
        trees after 3 s; Celery's warm shutdown with the thread pool takes about 10 s here, and
        a cold one (SIGQUIT) was no faster."""
        for signum, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            running = [p for p in self._processes if p.returncode is None]
            if not running:
                break
            for process in running:
                with contextlib.suppress(ProcessLookupError, psutil.Error):
                    for member in tree(process.pid) if signum == signal.SIGKILL else []:
                        member.kill()
                    process.send_signal(signum)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), grace)
        for log in self._logs:
            log.close()

    async def teardown(self) -> None:
        await self._delete()


class Dramatiq(_Peer):
    name = "dramatiq"
    fmt = "dramatiq"

    def queue_arguments(self) -> dict[str, Any]:
        # what dramatiq's RabbitmqBroker declares, so that its own declaration matches
        return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{self.target}.XQ"}

    def extra_queues(self) -> Sequence[str]:
        return (f"{self.target}.DQ", f"{self.target}.XQ")

    def commands(self) -> list[list[str]]:
        return [
            [sys.executable, "-m", "dramatiq", "bench.peers.dramatiq_app",
             "--processes", str(PROCESSES), "--threads", str(THREADS)]
        ]  # fmt: skip


class Celery(_Peer):
    name = "celery"
    fmt = "celery"

    def commands(self) -> list[list[str]]:
        return [
            [sys.executable, "-m", "celery", "-A", "bench.peers.celery_app", "worker",
             "--pool", "threads", "--concurrency", str(THREADS), "--loglevel", "WARNING",
             "-n", f"bench{number}@%h", "--without-mingle", "--without-gossip",
             "--without-heartbeat"]
            for number in range(1, PROCESSES + 1)
        ]  # fmt: skip


class Floor(_Peer):
    """Not a peer but the smallest honest loop (``bench.floor``): claim, POST, mark sent, ack;
    one process, asyncpg and uvloop, no retries. Opt-in: ``--systems floor``."""

    name = "floor"
    fmt = "raw"
    records = True
    consumers = 1

    async def setup(self) -> None:
        settings = load_settings()
        self.database = f"bench_{self.run}"
        admin = with_path(settings.database_url, "postgres")
        await recreate_database(admin, self.database)
        dsn = with_path(settings.database_url, self.database)
        self.dsn = dsn.replace("+asyncpg", "")
        await super().setup()

    def commands(self) -> list[list[str]]:
        return [
            [sys.executable, "-m", "bench.floor", "--dsn", self.dsn, "--amqp", self.amqp_url,
             "--queue", self.target, "--provider", self.provider.url,
             "--prefetch", str(THREADS)]
        ]  # fmt: skip


def make(
    name: str, run: str, provider: Provider, retry: Retry, extra_env: dict[str, str]
) -> System:
    classes: dict[str, type[System]] = {
        "worker": Worker, UNPARTITIONED: UnpartitionedWorker, "dramatiq": Dramatiq,
        "celery": Celery, "floor": Floor,
    }  # fmt: skip
    cls = classes[name]
    suffix = name.replace("-", "_")  # queue and database names
    return cls(f"{run}_{suffix}" if name != "worker" else run, provider, retry, extra_env)
