"""A throwaway three-node RabbitMQ cluster on this machine, for the cluster tests and the
quorum benchmark.

The machine's own node (``rabbit@localhost``) is never touched: each node here has its own
name, AMQP and distribution ports, data, log and config files under one temporary directory
owned by the ``rabbitmq`` user (the server must run as that user, with the machine's Erlang
cookie in its home). The nodes boot in parallel; the second and third then join the first with
``rabbitmqctl join_cluster``. Each node runs in a process group of its own, so that
:meth:`LocalCluster.kill` (SIGKILL, as a crashed host) and :meth:`LocalCluster.close` end the
node's shell, VM and helpers by that group's id and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
RABBITMQ_HOME = Path("/var/lib/rabbitmq")  # holds the Erlang cookie the CLI and nodes share
USER = "rabbitmq"


def available() -> str | None:
    """Why a local cluster cannot be started here (None: it can)."""
    if not SERVER.exists() or not CTL.exists():
        return f"no RabbitMQ server at {SERVER}"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no user {USER!r}"
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != USER:
        return f"starting RabbitMQ nodes needs root or the {USER!r} user"
    return None


@dataclass
class Node:
    name: str  # short name, e.g. nw1
    amqp_port: int
    dist_port: int
    base: Path
    process: asyncio.subprocess.Process | None = None

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(RABBITMQ_HOME),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.base / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }


def _as_rabbitmq() -> dict[str, object]:
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@dataclass
class LocalCluster:
    """Nodes ``<prefix>1…<prefix>N`` with the AMQP and distribution ports given (by default
    ports free right now, so that two runs on one machine never meet)."""

    prefix: str = "nw"
    size: int = 3
    amqp_ports: list[int] = field(default_factory=list)
    dist_ports: list[int] = field(default_factory=list)
    root: Path | None = None
    nodes: list[Node] = field(default_factory=list)
    start_seconds: float = 0.0

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """``WORKER_AMQP_URL`` for a replica: every node, comma-separated."""
        return ",".join(self.urls)

    def node(self, name: str) -> Node:
        short = name.split("@", 1)[0]
        return next(node for node in self.nodes if node.name == short)

    async def start(self) -> None:
        started = time.monotonic()
        reap_orphans()
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-cluster-"))
        (self.root / "owner").write_text(str(os.getpid()))
        owner = pwd.getpwnam(USER)
        amqp_ports = self.amqp_ports or [free_port() for _ in range(self.size)]
        dist_ports = self.dist_ports or [free_port() for _ in range(self.size)]
        for i in range(1, self.size + 1):
            base = self.root / f"{self.prefix}{i}"
            node = Node(f"{self.prefix}{i}", amqp_ports[i - 1], dist_ports[i - 1], base)
            base.mkdir()
            (base / "rabbitmq.conf").write_text(
                f"listeners.tcp.1 = 127.0.0.1:{node.amqp_port}\n"
                "loopback_users.guest = true\n"
                # a 3-node cluster on one small machine: never block publishers for memory
                "vm_memory_high_watermark.relative = 0.8\n"
                "disk_free_limit.absolute = 50MB\n"
            )
            # as rabbitmq/cluster-advanced.config: a dead-lettered hop whose confirm was lost
            # with a killed node is sent again after 10 s, not the default 180 s
            (base / "advanced.config").write_text(
                "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 10000}]}].\n"
            )
            (base / "enabled_plugins").write_text("[].\n")
            self.nodes.append(node)
        for path in (self.root, *self.root.rglob("*")):
            if os.geteuid() == 0:
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self.root.chmod(0o755)
        try:
            await asyncio.gather(*(self._boot(node) for node in self.nodes))
            first = self.nodes[0]
            for node in self.nodes[1:]:
                await ctl(node, "stop_app")
                await ctl(node, "join_cluster", first.node)
                await ctl(node, "start_app")
            await asyncio.gather(*(self._await_startup(node) for node in self.nodes))
        except BaseException:
            await self.close()
            raise
        self.start_seconds = time.monotonic() - started

    async def _boot(self, node: Node) -> None:
        log = (node.base / "console.log").open("ab")
        try:
            node.process = await asyncio.create_subprocess_exec(
                str(SERVER),
                env=node.env(),
                cwd=str(node.base),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed by that group's id
                **_as_rabbitmq(),  # type: ignore[arg-type]
            )
        finally:
            log.close()
        # for reap_orphans(), should this process die without closing the cluster
        (node.base / "pgid").write_text(str(node.process.pid))
        await self._await_startup(node)

    async def _await_startup(self, node: Node, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if node.process is not None and node.process.returncode is not None:
                raise RuntimeError(f"{node.node} exited:\n{_tail(node.base / 'console.log')}")
            if await _port_open(node.amqp_port):
                with contextlib.suppress(RuntimeError):
                    await ctl(node, "await_startup", "--timeout", "10")
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.node} did not start in {timeout:.0f} s")
            await asyncio.sleep(0.3)

    async def kill(self, name: str) -> None:
        """SIGKILL the node's whole process group: a crashed host, no goodbye."""
        node = self.node(name)
        _kill_group(node)
        if node.process is not None:
            await node.process.wait()

    async def restart(self, name: str) -> None:
        """Boot a killed node again on its data: it rejoins the cluster by itself."""
        await self._boot(self.node(name))

    def is_running(self, name: str) -> bool:
        process = self.node(name).process
        return process is not None and process.returncode is None

    async def ensure_running(self) -> None:
        """Boot again every node a test killed and left down."""
        down = [node for node in self.nodes if not self.is_running(node.name)]
        await asyncio.gather(*(self._boot(node) for node in down))

    async def leader(self, queue: str) -> str:
        """The node that leads quorum queue ``queue`` (asked of any running node)."""
        for node in self.nodes:
            if node.process is None or node.process.returncode is not None:
                continue
            with contextlib.suppress(RuntimeError):
                out = await ctl(
                    node, "list_queues", "name", "leader", "--quiet", "--no-table-headers"
                )
                for line in out.splitlines():
                    parts = line.split("\t")
                    if len(parts) == 2 and parts[0] == queue:
                        return parts[1].strip()
        raise RuntimeError(f"no leader found for {queue}")

    async def close(self) -> None:
        """Kill every node by its process group and delete the directory."""
        for node in self.nodes:
            _kill_group(node)
        for node in self.nodes:
            if node.process is not None and node.process.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(node.process.wait(), 10)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def reap_orphans() -> None:
    """Kill the nodes of clusters whose owning process died without closing them (a test run
    killed by a signal): each node by its process group, checked to still be that node."""
    for owner in Path(tempfile.gettempdir()).glob("*-cluster-*/owner"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(owner.read_text())
            if Path(f"/proc/{pid}").exists():
                continue  # its owner is alive
            for pgid_file in owner.parent.glob("*/pgid"):
                pgid = int(pgid_file.read_text())
                name = f"RABBITMQ_NODENAME={pgid_file.parent.name}@localhost".encode()
                for proc in Path("/proc").glob("[0-9]*"):
                    with contextlib.suppress(OSError):
                        if os.getpgid(int(proc.name)) == pgid and name in (
                            proc / "environ"
                        ).read_bytes().split(b"\0"):
                            os.killpg(pgid, signal.SIGKILL)
                            break
            shutil.rmtree(owner.parent, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill_group(node: Node) -> None:
    if node.process is None or node.process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.process.pid, signal.SIGKILL)


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def ctl(node: Node, *args: str) -> str:
    """``rabbitmqctl -n <node> …`` as the rabbitmq user (the cookie is in its home)."""
    process = await asyncio.create_subprocess_exec(
        str(CTL),
        "-n",
        node.node,
        *args,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(RABBITMQ_HOME),
            "LANG": "C.UTF-8",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        },
        cwd=str(RABBITMQ_HOME),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        **_as_rabbitmq(),  # type: ignore[arg-type]
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl -n {node.node} {' '.join(args)}: {out.decode()[-400:]}")
    return out.decode()


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
