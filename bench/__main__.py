"""The benchmarks: ``python -m bench`` (``make bench``) runs every scenario for every system.

Systems: the worker (2 replicas × 16 concurrency), Dramatiq and Celery (2 processes × 16
threads each), against one provider process and the same message stream (``bench.scenarios``).
Each scenario runs ``--runs`` times (default 3) per system, interleaved (backlog_memory once);
the medians are printed, written to ``bench/results/results.json`` with one picture per
scenario, and the README's benchmark section is rewritten from them. ``--only`` some scenarios
or ``--systems`` some systems write ``bench/results/partial.json`` and ``partial-*.png`` and
leave the README alone. ``--quick``: small counts, one run, about three minutes.
``--profile``: py-spy on a process of each system during steady_drain, top entries in
``bench/results/profile-<system>.txt``. ``--worker-env KEY=VALUE``: extra environment for
``worker run``. ``--readme``: only rewrite the README from the existing ``results.json``.
Benchmarks, not tests: nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from datetime import UTC, datetime
from typing import Any

import psutil

from bench import report, scenarios
from bench.lib import RESULTS, Provider, medians, write_json
from bench.systems import ALL_SYSTEMS, SYSTEMS

ONCE = ("backlog_memory", "long_outage")  # long ones: one run
SHORT = (
    "system", "msgs_per_s", "cpu_system_per_1000", "bottleneck", "lost", "stale_sends", "wall_s"
)  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, Any]:
    chosen = scenarios.scenarios(args.quick)
    options = scenarios.Options(args.systems, dict(args.worker_env), profile=args.profile)
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "runs": args.runs,
        "quick": args.quick,
        "worker_env": dict(args.worker_env),
        "profiled": args.profile,
        "scenarios": {},
    }
    started = time.monotonic()
    async with Provider() as provider:
        for name in args.only:
            if name not in chosen:
                continue
            scenario = chosen[name]
            print(f"{name}: {scenario.about}; {scenario.messages} messages", flush=True)
            systems = scenario.systems(args.systems)
            samples: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
            runs = 1 if name in ONCE else args.runs
            for run_ in range(runs):
                for system in systems:
                    figures = await scenarios.measure(scenario, system, provider, options)
                    samples[system].append(figures)
                    short = {k: figures.get(k) for k in SHORT}
                    print(f"  run {run_ + 1}: {short}", flush=True)
            results["scenarios"][name] = {
                "about": scenario.about,
                "messages": scenario.messages,
                "rate": scenario.rate,
                "systems": {
                    s: {"median": medians(runs), "runs": runs} for s, runs in samples.items()
                },
            }
    done = results["scenarios"]
    if "backlog_memory" in args.only and "backlog_memory" not in chosen and "steady_drain" in done:
        about = "--quick: steady_drain's preloaded backlog, RSS over the drain"
        done["backlog_memory"] = {**done["steady_drain"], "about": about}
    results["seconds"] = round(time.monotonic() - started)
    return results


def _env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    names = list(scenarios.scenarios(False))
    parser.add_argument("--runs", type=int, default=None, help="default 3, --quick 1")
    parser.add_argument("--quick", action="store_true", help="small counts, one run")
    parser.add_argument("--only", nargs="+", choices=names, default=names)
    parser.add_argument(
        "--systems", nargs="+", choices=ALL_SYSTEMS, default=list(SYSTEMS),
        help="default: worker dramatiq celery; floor (bench.floor, the smallest loop) on request",
    )  # fmt: skip
    parser.add_argument(
        "--worker-env", type=_env, action="append", default=[], metavar="KEY=VALUE",
        help="extra environment for `worker run` (e.g. a feature switch), repeatable",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="py-spy during steady_drain")
    parser.add_argument("--readme", action="store_true", help="only rewrite README.md's table")
    args = parser.parse_args()
    if args.readme:
        report.rewrite_readme(json.loads((RESULTS / "results.json").read_text()))
        print(f"rewrote {report.README} from {RESULTS / 'results.json'}")
        return
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    results = asyncio.run(run(args))
    print(f"\n== results (median of {args.runs} run(s); {results['machine']}; "
          f"{results['seconds']} s) ==")  # fmt: skip
    print("CPU s/1000: system/broker/pg/provider/pub; bottleneck: the busiest process group")
    print(report.text_tables(results))
    from bench.plot import plot  # matplotlib only when there is something to draw

    complete = args.only == names and args.systems == list(SYSTEMS)
    path = write_json("results" if complete else "partial", results)
    pictures = plot(results, RESULTS, prefix="" if complete else "partial-")
    print(f"wrote {path} and {', '.join(p.name for p in pictures)}")
    if complete:
        report.rewrite_readme(results)
        print(f"rewrote the benchmark section of {report.README}")


if __name__ == "__main__":
    main()
