"""The benchmarks: ``python -m bench`` (``make bench``) runs all four.

steady, recovery_drain and partial_outage run ``--runs`` times (default 3) and report the
median; backlog memory runs once. Prints each table, writes ``bench/results/results.json``
and ``bench/results/results.png``. ``--only NAME…`` runs some of them and writes
``bench/results/<names>.json`` instead. Benchmarks, not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from datetime import UTC, datetime
from typing import Any

import psutil

from bench import backlog_memory, partial_outage, recovery_drain, steady
from bench.lib import RESULTS, write_json
from bench.plot import plot


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "runs": args.runs,
    }
    started = time.monotonic()
    if "steady" in args.only:
        print(f"steady: {args.messages} messages, floor and worker ×1, ×2, {args.runs} runs")
        results["steady"] = await steady.run_steady(args.messages, args.runs)
    if "recovery_drain" in args.only:
        print(f"recovery_drain: backlog {args.backlog}, fresh {args.fresh}")
        results["recovery_drain"] = await recovery_drain.run_recovery(
            args.backlog, args.fresh, args.runs
        )
    if "partial_outage" in args.only:
        print(f"partial_outage: {args.rate}/s, outage {args.outage:.0f} s")
        results["partial_outage"] = await partial_outage.run_partial(
            args.rate, args.outage, args.runs
        )
    if "backlog_memory" in args.only:
        print(f"backlog memory: {args.backlog_messages} messages")
        results["backlog_memory"] = await backlog_memory.measure(args.backlog_messages)
    results["seconds"] = round(time.monotonic() - started)
    return results


TABLES = {
    "steady": steady.print_table,
    "recovery_drain": recovery_drain.print_table,
    "partial_outage": partial_outage.print_table,
    "backlog_memory": backlog_memory.print_table,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=20_000, help="steady")
    parser.add_argument("--backlog", type=int, default=3000, help="recovery_drain")
    parser.add_argument("--fresh", type=int, default=300, help="recovery_drain")
    parser.add_argument("--rate", type=int, default=100, help="partial_outage, messages/s")
    parser.add_argument("--outage", type=float, default=60, help="partial_outage, seconds")
    parser.add_argument("--backlog-messages", type=int, default=200_000, help="backlog memory")
    parser.add_argument("--only", nargs="+", choices=list(TABLES), default=list(TABLES))
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(f"\n== results (median of {args.runs} runs; {results['machine']}) ==")
    for name, print_table in TABLES.items():
        if name in results:
            print_table(results[name])
    if len(args.only) < len(TABLES):
        print(f"wrote {write_json('-'.join(args.only), results)}")
        return
    path = write_json("results", results)
    plot(results, RESULTS / "results.png")
    print(f"wrote {path} and {RESULTS / 'results.png'}")


if __name__ == "__main__":
    main()
