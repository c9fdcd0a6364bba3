"""The scenarios, each run for every system against the same provider process and the same
message stream (the same bodies, so the same idempotency keys and topics).

* ``steady_drain`` — a preloaded backlog of distinct topics, drained by a healthy provider
  (200 in about 2 ms): messages/s and CPU per message.
* ``steady_rate`` — a fixed rate below everyone's capacity: publish → acceptance p50/p99.
* ``partial_outage`` — a fixed rate over the eight (channel, audience) groups; for a while the
  provider answers 500 for (email, b) and (sms, c). Healthy groups' latency during the outage
  against theirs in as long a healthy phase before it (p99s of as many messages), provider
  requests per published message, recovery → last failed-group message sent.
* ``full_outage`` — a fixed rate; the provider answers 500 to everything, then recovers while
  the stream goes on: fresh messages' p50/p99 after recovery, recovery → last backlog message.
* ``slow_recovery`` — as ``full_outage``, but the provider comes back slower (more latency, a
  few requests at a time), so the retry backlog competes with fresh messages for capacity.
* ``backlog_memory`` — a large preloaded backlog; the RSS of the system's processes over the
  drain.

Topics repeat in the outage scenarios (a small ticker set), so an older price retried after a
newer one was sent shows as a *stale send*.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.lib import (
    RESULTS,
    Provider,
    Publisher,
    outcome,
    percentile,
    price_changes,
    publish,
    published,
    wait_until,
)
from bench.systems import UNPARTITIONED, Retry, System, make

FAILING = (("email", "b"), ("sms", "c"))
WARM_UP_S = 5  # the start of a run that no latency figure counts
# the outage scenarios' policy for every system: from 1 s, capped, never exhausted
OUTAGE_RETRY = Retry(max_attempts=100, base_s=1, cap_s=8)
QUICK_OUTAGE_RETRY = Retry(max_attempts=100, base_s=1, cap_s=2)  # --quick: drains sooner
# a long outage at the backoff of production: from 5 s, capped at 10 minutes
PRODUCTION_RETRY = Retry(max_attempts=100, base_s=5, cap_s=600)
ALL_500 = [{"status": 500}]


@dataclass(frozen=True)
class Phase:
    """From ``at`` seconds after the stream starts, the provider behaves like this."""

    at: float
    rules: Sequence[dict[str, Any]] = ()
    latency_ms: int | None = None
    capacity: int | None = None
    recovery: bool = False  # the moment the provider recovers (fresh after it, backlog before)


@dataclass(frozen=True)
class Scenario:
    name: str
    messages: int
    rate: float = 0  # 0: preloaded before the system starts
    tickers: int | None = None
    phases: Sequence[Phase] = (Phase(0),)
    retry: Retry = field(default_factory=Retry)
    timeout: float = 300
    about: str = ""
    before_after: bool = False  # the worker with partition health off beside the worker
    peers: bool = True  # False: the worker only (a long outage at production backoff)
    # how long without progress ends the wait (0: the retry cap, at most 30 s, + 5 s); a long
    # backoff leaves gaps of minutes between the last retries of a backlog
    settle_s: float = 0

    def systems(self, chosen: Sequence[str]) -> list[str]:
        """The chosen systems this scenario runs."""
        out = [s for s in chosen if self.peers or s.startswith("worker")]
        if self.before_after and "worker" in out and UNPARTITIONED not in out:
            out.insert(out.index("worker") + 1, UNPARTITIONED)
        return out if self.before_after else [s for s in out if s != UNPARTITIONED]


def scenarios(quick: bool) -> dict[str, Scenario]:
    q = quick
    rate = 100
    # the healthy phase before an outage is its "steady": a warm-up, then as long as the outage
    # (the long one: half as long), so that both p99s are read off as many messages
    partial_base, partial_out = (6, 4) if q else (WARM_UP_S + 40, 40)
    long_base, long_out, long_after = (5, 20, 10) if q else (WARM_UP_S + 60, 120, 20)
    long_rate = 50
    full_out, full_after = (3, 3) if q else (30, 15)
    slow_out, slow_after = (3, 3) if q else (30, 20)
    slow_rate = 150
    retry = QUICK_OUTAGE_RETRY if q else OUTAGE_RETRY
    chosen = {
        "steady_drain": Scenario(
            "steady_drain", 3000 if q else 20_000, about="preloaded backlog, healthy provider"
        ),
        "steady_rate": Scenario(
            "steady_rate", (200 if q else 500) * (3 if q else 30), rate=200 if q else 500,
            about="fixed rate, healthy provider",
        ),
        "partial_outage": Scenario(
            "partial_outage", rate * (partial_base + partial_out), rate=rate, tickers=25,
            phases=(
                Phase(0),
                Phase(partial_base, [{"channel": c, "audience": a, "status": 500}
                                     for c, a in FAILING]),
                Phase(partial_base + partial_out, recovery=True),
            ),
            retry=retry, before_after=True,
            about=f"500 for {', '.join('/'.join(g) for g in FAILING)} of 8 groups",
        ),
        "full_outage": Scenario(
            "full_outage", rate * (full_out + full_after), rate=rate, tickers=50,
            phases=(Phase(0, ALL_500), Phase(full_out, recovery=True)),
            retry=retry, before_after=True,
            about="500 for everything, then healthy with fresh traffic",
        ),
        "long_outage": Scenario(
            "long_outage", long_rate * (long_base + long_out + long_after), rate=long_rate,
            tickers=25,
            phases=(
                Phase(0),
                Phase(long_base, [{"channel": c, "audience": a, "status": 500}
                                  for c, a in FAILING]),
                Phase(long_base + long_out, recovery=True),
            ),
            retry=PRODUCTION_RETRY, before_after=True, peers=False, timeout=900, settle_s=305,
            about=f"500 for {', '.join('/'.join(g) for g in FAILING)} for {long_out} s at "
            f"production backoff (from {PRODUCTION_RETRY.base_s:g} s, capped at "
            f"{PRODUCTION_RETRY.cap_s:g} s), then fresh traffic",
        ),
        "slow_recovery": Scenario(
            "slow_recovery", slow_rate * (slow_out + slow_after), rate=slow_rate, tickers=50,
            phases=(
                Phase(0, ALL_500),
                Phase(slow_out, latency_ms=20, capacity=8, recovery=True),
            ),
            retry=retry,
            about="500 for everything, then back at 20 ms and 8 at a time (≈400/s)",
        ),
    }  # fmt: skip
    if not quick:  # --quick reads the backlog's memory off steady_drain's preloaded backlog
        chosen["backlog_memory"] = Scenario(
            "backlog_memory",
            100_000,
            timeout=900,
            about="large preloaded backlog: RSS over the drain",
        )
    return chosen


@dataclass
class Options:
    systems: Sequence[str]
    worker_env: dict[str, str]
    profile: bool = False
    profile_seconds: float = 10


def _meter(system: System, provider: Provider, publisher: list[Publisher]) -> procs.Meter:
    broker = procs.listener_pid(5672)
    postmaster = procs.listener_pid(5432)
    return procs.Meter(
        {
            "system": procs.Group("system", system.processes),
            "broker": procs.Group("broker", lambda: procs.tree(broker) if broker else []),
            "postgres": procs.Group(
                "postgres", lambda: procs.postgres_processes(postmaster, system.database)
            ),
            "provider": procs.Group("provider", lambda: procs.tree(provider.pid)),
            "publisher": procs.Group(
                "publisher", lambda: [p for pub in publisher for p in procs.tree(pub.pid)]
            ),
        }
    )


async def _switch(provider: Provider, phases: Sequence[Phase], began: float) -> dict[int, float]:
    """Apply each phase at its time; when each was applied (monotonic)."""
    applied = {}
    for index, phase in enumerate(phases):
        await asyncio.sleep(max(began + phase.at - time.monotonic(), 0))
        await provider.set(phase.rules, latency_ms=phase.latency_ms, capacity=phase.capacity)
        applied[index] = time.monotonic()
    return applied


BROKER_LOCK = Path("/tmp/nw-broker.lock")


@contextlib.asynccontextmanager
async def broker_shared() -> AsyncIterator[None]:
    """A shared ``flock`` on the lock that broker-wide faults (stop_app, close_all_connections)
    of the fault suite take exclusively: one measurement is never cut by another's fault."""
    lock = await asyncio.to_thread(BROKER_LOCK.open, "a")
    try:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_SH)
        yield
    finally:
        lock.close()  # releases the lock


async def measure(
    scenario: Scenario, name: str, provider: Provider, options: Options
) -> dict[str, Any]:
    async with broker_shared():
        started = time.monotonic()
        figures = await _measure(scenario, name, provider, options)
        figures["wall_s"] = round(time.monotonic() - started, 1)  # set-up and tear-down too
        return figures


async def _measure(
    scenario: Scenario, name: str, provider: Provider, options: Options
) -> dict[str, Any]:
    env = options.worker_env if name.startswith("worker") else {}
    system = make(name, scenario.name, provider, scenario.retry, env)
    bodies = price_changes(scenario.messages, tickers=scenario.tickers)
    await provider.reset()
    first = scenario.phases[0]
    await provider.set(first.rules, latency_ms=first.latency_ms, capacity=first.capacity)
    await system.setup()
    publishers: list[Publisher] = []
    meter = _meter(system, provider, publishers)
    profiler: asyncio.subprocess.Process | None = None
    try:
        if scenario.rate == 0:
            pub = await publish(system.amqp_url, system.fmt, system.target, bodies)
            sent_at = await pub.done()
            await system.start()
            meter.begin()
            already = await system.finished()
            began = meter.started
            switching = asyncio.create_task(_switch(provider, scenario.phases, began))
        else:
            await system.start()
            meter.begin()
            already = 0
            began = meter.started
            switching = asyncio.create_task(_switch(provider, scenario.phases, began))
            pub = await publish(system.amqp_url, system.fmt, system.target, bodies,
                                rate=scenario.rate)  # fmt: skip
            publishers.append(pub)
        if options.profile and scenario.name == "steady_drain":
            profiler = await _start_profiler(system)

        # Done when every message is finished, or when nothing has moved (finished count,
        # provider requests) for longer than a retry can wait: a system that dropped or
        # stranded messages then shows them as lost instead of hanging the bench.
        settle = scenario.settle_s or min(scenario.retry.cap_s, 30) + 5
        progress: list[Any] = [None, time.monotonic()]
        finished_count = 0

        async def finished() -> bool:
            nonlocal finished_count
            finished_count = await system.finished()
            if finished_count >= scenario.messages:
                return True
            now = (finished_count, (await provider.stats())["requests"])
            if now != progress[0]:
                progress[:] = [now, time.monotonic()]
                return False
            publishing = (
                scenario.rate > 0 and pub.process is not None and (pub.process.returncode is None)
            )
            return not publishing and time.monotonic() - progress[1] > settle

        await wait_until(finished, scenario.timeout, f"{name} to finish", every=0.25,
                         on_tick=meter.sample, strict=False)  # fmt: skip
        meter.end()
        if finished_count < scenario.messages:
            print(f"  {name}: {finished_count} of {scenario.messages} finished, then no "
                  f"progress for {settle:.0f} s; the rest count as lost", flush=True)  # fmt: skip
            meter.ended = progress[1]  # the rate up to the last progress, not the wait
        if profiler is not None:
            await _stop_profiler(profiler, name)
        if scenario.rate > 0:
            sent_at = await pub.done()
        applied = await switching
        records = await provider.requests()
    finally:
        if profiler is not None and profiler.returncode is None:
            profiler.kill()
        with contextlib.suppress(Exception):
            await system.stop()
        await system.teardown()
    figures = _figures(scenario, system, meter, bodies, sent_at, records, applied, already)
    figures["finished"] = finished_count  # the system's own count (the worker: rows not pending)
    # the publisher's own account (the meter misses its last moments, and a preload's
    # publishing happens before the measurement): CPU of publishing these messages
    figures["cpu_publisher_per_1000"] = round(pub.cpu_s / len(bodies) * 1000, 3)
    if scenario.rate == 0:
        figures["publisher_before_measurement"] = True
    return figures


def _figures(
    scenario: Scenario,
    system: System,
    meter: procs.Meter,
    bodies: Sequence[bytes],
    sent_at: Sequence[float],
    records: Sequence[dict[str, Any]],
    applied: dict[int, float],
    already: int,
) -> dict[str, Any]:
    messages = published(bodies, sent_at)
    seen = outcome(records)
    counted = max(len(messages) - already, 1)
    elapsed = meter.seconds if scenario.rate == 0 else meter.ended - min(sent_at)
    figures: dict[str, Any] = {
        "system": system.name,
        "records_in_postgres": system.records,
        "messages": len(messages),
        "seconds": round(elapsed, 2),
        "msgs_per_s": round(counted / elapsed, 1),
        "requests_per_published": round(seen.requests / len(messages), 3),
        "lost": seen.lost(messages),
        "duplicate_requests": seen.duplicates,
        "stale_sends": seen.stale,
        **meter.figures(counted),
    }
    figures["cpu_ms_per_msg_system"] = round(figures["cpu_system_per_1000"], 3)
    figures["bottleneck"] = procs.bottleneck(figures, fixed_rate=scenario.rate > 0)
    if scenario.rate > 0:
        figures["publish_rate"] = round(len(sent_at) / max(max(sent_at) - min(sent_at), 1e-9), 1)
        if figures["publish_rate"] < 0.9 * scenario.rate:
            figures["bottleneck"] = "bench-bound: publisher"
        latencies = seen.latencies(messages)
        figures["p50_ms"] = round(percentile(latencies, 50) * 1000, 1)
        figures["p99_ms"] = round(percentile(latencies, 99) * 1000, 1)
    recovery = next((i for i, p in enumerate(scenario.phases) if p.recovery), None)
    if recovery is not None:
        at = applied[recovery]
        fresh = [m for m in messages if m.sent_at >= at]
        backlog = [m for m in messages if m.sent_at < at]
        if len(scenario.phases) > 2:  # partial outage: the backlog is the failing groups'
            outage_from = applied[1]
            failing = {f"|{c}|{a}" for c, a in FAILING}
            backlog = [
                m for m in backlog
                if m.sent_at >= outage_from and any(m.topic.endswith(g) for g in failing)
            ]  # fmt: skip
            healthy = [
                m for m in messages
                if outage_from <= m.sent_at < at and not any(m.topic.endswith(g) for g in failing)
            ]  # fmt: skip
            lat = seen.latencies(healthy)
            figures["healthy_p50_ms"] = round(percentile(lat, 50) * 1000, 1)
            figures["healthy_p99_ms"] = round(percentile(lat, 99) * 1000, 1)
            # the same groups before the outage, in the same run: what "steady" means here
            # (after the systems' warm-up)
            warm = applied[0] + min(WARM_UP_S, (outage_from - applied[0]) / 2)
            steady = seen.latencies([
                m for m in messages
                if warm <= m.sent_at < outage_from and not any(m.topic.endswith(g) for g in failing)
            ])  # fmt: skip
            figures["steady_p99_ms"] = round(percentile(steady, 99) * 1000, 1)
            if figures["steady_p99_ms"]:
                ratio = figures["healthy_p99_ms"] / figures["steady_p99_ms"]
                figures["healthy_p99_vs_steady"] = round(ratio, 2)
        if len(fresh) >= 2 * scenario.rate:  # the stream goes on after recovery: fresh ones
            lat = seen.latencies(fresh)
            figures["fresh_p50_ms"] = round(percentile(lat, 50) * 1000, 1)
            figures["fresh_p99_ms"] = round(percentile(lat, 99) * 1000, 1)
            figures["fresh_messages"] = len(fresh)
        done = [seen.accepted_at[m.key] for m in backlog if m.key in seen.accepted_at]
        figures["recovery_to_last_backlog_s"] = round(max(done) - at, 2) if done else None
        figures["backlog_messages"] = len(backlog)
    if scenario.rate == 0:  # a preloaded backlog: its memory curve
        figures["rss_samples"] = meter.rss_samples
    return figures


async def _start_profiler(system: System) -> asyncio.subprocess.Process | None:
    pids = system.root_pids()
    if not pids:
        return None
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"profile-{system.name}.raw"
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        print("  --profile: py-spy is not installed (pip install -e '.[bench]')", flush=True)
        return None
    return await asyncio.create_subprocess_exec(
        str(spy), "record", "--pid", str(pids[0]), "--subprocesses", "--rate", "200",
        "--format", "raw", "--output", str(out), "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def _stop_profiler(profiler: asyncio.subprocess.Process, name: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        profiler.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(profiler.wait(), 30)
    except TimeoutError:
        profiler.kill()
        return
    raw = RESULTS / f"profile-{name}.raw"
    if raw.exists():
        top = top_entries(raw.read_text().splitlines())
        (RESULTS / f"profile-{name}.txt").write_text(top)
        print(top, flush=True)


def top_entries(lines: Sequence[str], count: int = 25) -> str:
    """The collapsed stacks' top frames by own samples and by samples including callees."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        samples += int(n)
        own[frames[-1]] += int(n)
        for frame in set(frames[1:]):  # the first frame names the process/thread
            total[frame] += int(n)
    out = [f"py-spy: {samples} samples", f"\ntop {count} by own samples:"]
    out += [f"{n / samples:7.1%}  {frame}" for frame, n in own.most_common(count)]
    out += [f"\ntop {count} including callees:"]
    out += [f"{n / samples:7.1%}  {frame}" for frame, n in total.most_common(count)]
    return "\n".join(out) + "\n"
