"""Where the CPU went: the process groups of one measurement and what each cost.

Every figure is split into *groups*: the system under test (its process trees), the broker
(the ``beam.smp`` listening on the AMQP port), PostgreSQL (the backends of this run's database
plus the server's own background processes, all children of the postmaster on the database
port), the provider and the publisher. CPU seconds are user + system from ``/proc`` (psutil);
processes that appear during a measurement (a new backend, a forked child) count from zero.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil

GROUPS = ("system", "broker", "postgres", "provider", "publisher")
BENCH_GROUPS = ("provider", "publisher")
# A single-threaded bench process this busy (cores) is where the run waited, not the system.
BENCH_BOUND_CORES = 0.85


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this machine, if one can be seen."""
    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    return None


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants (those still alive)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def postgres_processes(postmaster: int | None, database: str | None) -> list[psutil.Process]:
    """The postmaster's children serving ``database`` and its background processes.

    Backends of other databases (other people's tests on the same server) are left out;
    the shared background processes (WAL writer, checkpointer …) are counted.
    """
    if postmaster is None:
        return []
    chosen = []
    for child in tree(postmaster):
        with contextlib.suppress(psutil.Error):
            title = " ".join(child.cmdline())
            backend = "(" in title  # "postgres: 15/main: user db 127.0.0.1(port) idle"
            if not backend or (database is not None and f" {database} " in title):
                chosen.append(child)
    return chosen


@dataclass
class Group:
    """CPU and RSS of a changing set of processes: ``find`` is asked again at each sample."""

    name: str
    find: Callable[[], Iterable[psutil.Process]]
    _start: dict[int, float] = field(default_factory=dict)
    _last: dict[int, float] = field(default_factory=dict)
    rss_peak_mb: float = 0.0

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    def begin(self) -> None:
        self._start.clear()
        self._last.clear()
        self.rss_peak_mb = 0.0
        for process in self.find():
            with contextlib.suppress(psutil.Error):
                self._start[process.pid] = self._last[process.pid] = self._cpu(process)

    def sample(self) -> float:
        """Refresh CPU; returns the group's resident memory now (MB, summed)."""
        rss = 0
        for process in self.find():
            with contextlib.suppress(psutil.Error):
                self._last[process.pid] = self._cpu(process)
                self._start.setdefault(process.pid, 0.0)
                rss += process.memory_info().rss
        mb = rss / 2**20
        self.rss_peak_mb = max(self.rss_peak_mb, mb)
        return mb

    def cpu_seconds(self) -> float:
        return sum(self._last[pid] - start for pid, start in self._start.items())


@dataclass
class Meter:
    """The groups of one measurement, sampled together; the RSS curve of the system."""

    groups: dict[str, Group]
    started: float = 0.0
    ended: float = 0.0
    rss_samples: list[tuple[float, float]] = field(default_factory=list)
    _machine_start: float = 0.0
    _machine_end: float = 0.0

    def begin(self) -> None:
        for group in self.groups.values():
            group.begin()
        self.started = time.monotonic()
        self._machine_start = _machine_busy()
        self.rss_samples = []
        self.sample()

    def sample(self) -> None:
        for name, group in self.groups.items():
            mb = group.sample()
            if name == "system":
                self.rss_samples.append((round(time.monotonic() - self.started, 2), round(mb, 1)))

    def end(self) -> None:
        self.sample()
        self.ended = time.monotonic()
        self._machine_end = _machine_busy()

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def figures(self, messages: int) -> dict[str, float]:
        """CPU seconds per 1,000 messages and cores used, by group; the machine's busy cores."""
        out: dict[str, float] = {}
        for name, group in self.groups.items():
            cpu = group.cpu_seconds()
            out[f"cpu_{name}_per_1000"] = round(cpu / max(messages, 1) * 1000, 3)
            out[f"cores_{name}"] = round(cpu / max(self.seconds, 1e-9), 2)
        out["cores_machine"] = round(
            (self._machine_end - self._machine_start) / max(self.seconds, 1e-9), 2
        )
        # everything else on the machine meanwhile (other people's tests, the bench's driver)
        out["cores_other"] = round(
            max(out["cores_machine"] - sum(out[f"cores_{name}"] for name in self.groups), 0), 2
        )
        out["peak_rss_mb"] = round(self.groups["system"].rss_peak_mb, 1)
        return out


def _machine_busy() -> float:
    times = psutil.cpu_times()
    return float(times.user + times.system + getattr(times, "softirq", 0) + times.nice)


def bottleneck(figures: dict[str, float], *, fixed_rate: bool = False) -> str:
    """The busiest group and its cores; ``bench-bound: X`` when that is the bench's own
    provider or publisher at nearly a full core (one process each, so one core is its limit).
    ``machine full`` when all cores were busy (other load included); ``fixed rate`` when the
    publisher's rate, not a process, set the pace."""
    for name in BENCH_GROUPS:
        if figures.get(f"cores_{name}", 0.0) >= BENCH_BOUND_CORES:
            return f"bench-bound: {name}"
    busiest = max(GROUPS, key=lambda name: figures.get(f"cores_{name}", 0.0))
    label = f"{busiest} {figures.get(f'cores_{busiest}', 0.0):.2f} cores"
    if fixed_rate:
        return f"fixed rate; busiest {label}"
    if figures.get("cores_machine", 0.0) >= 0.9 * (psutil.cpu_count() or 1):
        label += ", machine full"
    return label
