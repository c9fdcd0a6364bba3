"""Real ``worker`` processes and a fresh world for them, for the demo, the fault suite and the
benchmarks.

It owns starting ``worker run`` replicas as separate OS processes with their logs in files,
waiting for them to start, stopping them (SIGTERM), killing them (SIGKILL), and resetting a
queue's broker objects and a database, so that each run begins from nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from worker.broker import connect_first
from worker.topology import Names


def worker_command(*args: str) -> list[str]:
    """The ``worker`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("worker")
    if script.exists():
        return [str(script), *args]
    code = f"import sys; from worker.cli import main; sys.exit(main({list(args)!r}))"
    return [sys.executable, "-c", code]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a replica's /metrics."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def recreate_database(admin_url: str, name: str) -> None:
    """Drop the database ``name`` (closing its sessions) and create it empty."""
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await engine.dispose()


async def delete_broker_objects(
    amqp_url: str, names: Names, source_exchange: str, attempt_queues: int = 1
) -> None:
    """Delete the work, ingress and delay queues and the exchanges of one worker queue (quorum
    mode: ``attempt_queues`` work queues, and the limit queue), on the first node answering."""
    async with await connect_first(amqp_url.split(",")) as connection:
        channel = await connection.channel()
        for queue in names.owned_queues(attempt_queues):
            await channel.queue_delete(queue)
        for exchange in (source_exchange, *names.owned_exchanges()):
            await channel.exchange_delete(exchange)


async def migrate(env: dict[str, str], log_path: Path) -> None:
    """``worker migrate`` as a process; raises RuntimeError with the log's tail if it fails."""
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *worker_command("migrate"), env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
        )
    if await process.wait() != 0:
        raise RuntimeError(f"worker migrate failed:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class ReplicaProcess:
    """One ``worker run`` process; each (re)start appends to the same log file."""

    number: int
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    _log_file: IO[bytes] | None = field(default=None, repr=False)
    _log_offset: int = 0

    @classmethod
    async def start_new(
        cls, number: int, env: dict[str, str], log_dir: Path, *, quiet: bool = True
    ) -> ReplicaProcess:
        replica = cls(number, env, log_dir / f"replica-{number}.log")
        await replica.start()
        if not quiet:
            assert replica.process is not None
            print(f"  replica {number}: pid {replica.process.pid}, log {replica.log_path}")
        return replica

    async def start(self) -> None:
        if self.running:
            raise RuntimeError(f"replica {self.number} is already running")
        self._close_log()
        self._log_file = self.log_path.open("ab")
        self._log_offset = self._log_file.tell()
        self.process = await asyncio.create_subprocess_exec(
            *worker_command("run"),
            env=self.env,
            stdout=self._log_file,
            stderr=asyncio.subprocess.STDOUT,
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self) -> None:
        """Raise RuntimeError with the log's tail if the process has exited."""
        if self.process is not None and self.process.returncode is not None:
            raise RuntimeError(
                f"replica {self.number} exited ({self.process.returncode}):\n{_tail(self.log_path)}"
            )

    def log_since_start(self) -> str:
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def started(self) -> bool:
        """True once this run logged its ``started`` event (JSON or console logs)."""
        self.check_alive()
        text_ = self.log_since_start()
        return '"event": "started"' in text_ or " started " in text_

    async def wait_started(self, timeout: float = 30) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.started():
            if loop.time() > deadline:
                raise RuntimeError(f"replica {self.number} did not start in {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 40) -> int | None:
        """SIGTERM, then the exit status; None if it had to be killed after ``timeout``."""
        if self.process is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), timeout=timeout)
        except TimeoutError:
            await self.kill()
            return None
        finally:
            self._close_log()

    def send_signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` now (SIGKILL or SIGSTOP from a callback that cannot wait)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def kill(self) -> None:
        """SIGKILL: no drain, no goodbye, as a crashed host or an OOM kill."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        await self.process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


async def start_replicas(
    count: int, env: dict[str, str], log_dir: Path, *, timeout: float = 30, quiet: bool = True
) -> list[ReplicaProcess]:
    """Start ``count`` replicas and wait until each has logged ``started``."""
    replicas = [
        await ReplicaProcess.start_new(number, env, log_dir, quiet=quiet)
        for number in range(1, count + 1)
    ]
    try:
        await asyncio.gather(*(replica.wait_started(timeout) for replica in replicas))
    except BaseException:
        await stop_replicas(replicas)
        raise
    return replicas


async def stop_replicas(replicas: list[ReplicaProcess]) -> list[int | None]:
    """SIGTERM to all at once; their exit statuses (None where one had to be killed)."""
    return list(await asyncio.gather(*(replica.stop() for replica in replicas)))
