"""The command lines' surface: `--version`, `--help` texts, and `worker check` against a real
HTTP server standing in for a replica's /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from worker import __version__
from worker.admin.cli import build_parser
from worker.cli import _parser, check, main
from worker.settings import ENV_PREFIX, Settings

SETTINGS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def _helps() -> dict[str, str]:
    """Both texts as an 80-column terminal shows them."""
    worker, admin = _parser(), build_parser()
    return {"worker": worker.format_help(), "worker-admin": admin.format_help()}


@pytest.mark.parametrize("prog", ["worker", "worker-admin"])
def test_help_is_plain_self_contained_and_names_the_variables(
    prog: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = _helps()[prog]
    assert "``" not in text, "no reST in --help"
    assert not re.search(r"SPEC|§|\.\./", text), "no documents outside this repository"
    named = set(re.findall(r"\bWORKER_[A-Z_]+\b", text))
    assert {"WORKER_DATABASE_URL", "WORKER_AMQP_URL"} <= named
    assert named <= SETTINGS, named - SETTINGS
    for document in re.findall(r"docs/[\w./-]+\.md", text):
        assert (Path(__file__).resolve().parents[2] / document).is_file(), document


@pytest.mark.parametrize("prog", ["worker", "worker-admin"])
def test_one_line_per_command(prog: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = _helps()[prog]
    block = text.split("COMMAND\n", 1)[1].split("\n\n", 1)[0]
    lines = block.splitlines()
    assert all(re.match(r"^    \w", line) for line in lines), block


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"worker {__version__}\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def _readyz(status: int) -> AsyncIterator[int]:
    async def answer(_: web.Request) -> web.Response:
        return web.json_response({"status": "whatever"}, status=status)

    app = web.Application()
    app.router.add_get("/readyz", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_check_is_0_when_ready_and_1_when_not() -> None:
    async with _readyz(200) as port:
        assert (await asyncio.to_thread(check, str(port), 2.0))[0] == 0
    async with _readyz(503) as port:
        code, reason = await asyncio.to_thread(check, str(port), 2.0)
    assert (code, reason) == (1, f"not ready: http://127.0.0.1:{port}/readyz answered 503")
    code, reason = await asyncio.to_thread(check, str(_free_port()), 2.0)
    assert code == 1
    assert "refused" in reason.lower()
    assert "\n" not in reason


def test_check_without_endpoints_or_with_a_bad_port() -> None:
    assert check("0", 1.0) == (
        1,
        "not ready: WORKER_METRICS_PORT is 0, the replica serves no /readyz",
    )
    assert check("nine", 1.0)[0] == 2


def test_check_reads_the_metrics_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORKER_METRICS_PORT", "0")
    assert main(["check"]) == 1
    assert capsys.readouterr().err == (
        "worker check: not ready: WORKER_METRICS_PORT is 0, the replica serves no /readyz\n"
    )
