"""The results as tables: printed after a run, and the README's section between its markers
(``python -m bench --readme`` rewrites it from ``bench/results/results.json``; a unit test
checks that the README's figures are the JSON's)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

README = Path(__file__).parent.parent / "README.md"
BEGIN = "<!-- bench:begin (written by python -m bench --readme from bench/results/results.json) -->"
END = "<!-- bench:end -->"
CPU_GROUPS = (
    ("system", "system"),
    ("broker", "broker"),
    ("postgres", "pg"),
    ("provider", "provider"),
    ("publisher", "pub"),
)


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def columns(scenario: str, m: dict[str, Any]) -> list[tuple[str, str]]:
    """(heading, cell) pairs of one system's row in one scenario."""
    bench_bound = str(m.get("bottleneck", "")).startswith("bench-bound")
    rate = "bench-bound" if bench_bound else _num(m.get("msgs_per_s"), 0)
    cells = [("system", str(m["system"])), ("msgs/s", rate)]
    cpu = "/".join(_num(m.get(f"cpu_{g}_per_1000"), 2) for g, _ in CPU_GROUPS)
    cells.append(("CPU s/1000 " + "/".join(label for _, label in CPU_GROUPS), cpu))
    cells.append(("peak RSS MB", _num(m.get("peak_rss_mb"), 0)))
    cells.append(("req/pub", _num(m.get("requests_per_published"), 2)))
    cells.append(("lost", _num(m.get("lost"), 0)))
    cells.append(("dup req", _num(m.get("duplicate_requests"), 0)))
    cells.append(("stale", _num(m.get("stale_sends"), 0)))
    if "p50_ms" in m and "fresh_p50_ms" not in m:
        cells.append(("p50/p99 ms", f"{_num(m['p50_ms'], 0)}/{_num(m['p99_ms'], 0)}"))
    if "healthy_p50_ms" in m:
        cells.append(
            ("healthy p50/p99 ms", f"{_num(m['healthy_p50_ms'], 0)}/{_num(m['healthy_p99_ms'], 0)}")
        )
    if "healthy_p99_vs_steady" in m:
        cells.append(("healthy p99 ÷ steady", _num(m["healthy_p99_vs_steady"], 2)))
    if "fresh_p50_ms" in m:
        cells.append(
            ("fresh p50/p99 ms", f"{_num(m['fresh_p50_ms'], 0)}/{_num(m['fresh_p99_ms'], 0)}")
        )
    if "recovery_to_last_backlog_s" in m:
        cells.append(("recovery→last backlog s", _num(m["recovery_to_last_backlog_s"], 1)))
    cells.append(("bottleneck", str(m.get("bottleneck", ""))))
    cells.append(("records in PG", "yes" if m.get("records_in_postgres") else "no"))
    return cells


def rows(results: dict[str, Any], name: str) -> tuple[list[str], list[list[str]]]:
    systems = results["scenarios"][name]["systems"]
    table = [columns(name, s["median"]) for s in systems.values()]
    if not table:
        return [], []
    return [h for h, _ in table[0]], [[c for _, c in row] for row in table]


def text_tables(results: dict[str, Any]) -> str:
    out = []
    for name, scenario in results["scenarios"].items():
        head, body = rows(results, name)
        if not head:
            continue
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
        out.append(f"\n{name}: {scenario['about']} ({scenario['messages']} messages)")
        out.append("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
        out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(out)


def markdown(results: dict[str, Any]) -> str:
    quick = (
        " (`--quick`: small counts, one run; not figures to quote)" if results.get("quick") else ""
    )
    out = [
        f"Measured {results['when']} on {results['machine']}{quick}, median of "
        f"{results['runs']} run(s). CPU is seconds per 1,000 messages of the system's processes, "
        "RabbitMQ, PostgreSQL (this run's backends and the server's own processes), the "
        "provider process and the publisher process (what publishing the messages cost it; for a "
        "preloaded backlog that happened before the measurement). The broker is shared with "
        "other work on this machine, so its figure is the noisiest. The peers record nothing "
        "in PostgreSQL. "
        "`bench-bound` means the bench's own provider or publisher was the limit, so no rate "
        "is claimed. Pictures: `bench/results/<scenario>.png`.",
    ]
    if results.get("profiled"):
        out.append(
            "\npy-spy was sampling one process of each system during steady_drain (`--profile`), "
            "which slows it; the profiles' top entries are `bench/results/profile-<system>.txt`."
        )
    if results.get("worker_env"):
        env = " ".join(f"{k}={v}" for k, v in results["worker_env"].items())
        out.append(f"\nWorker environment: `{env}`.")
    for name, scenario in results["scenarios"].items():
        head, body = rows(results, name)
        if not head:
            continue
        out.append(f"\n**{name}** — {scenario['about']}, {scenario['messages']} messages\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out) + "\n"


def rewrite_readme(results: dict[str, Any], path: Path = README) -> None:
    text = path.read_text()
    section = f"{BEGIN}\n{markdown(results)}{END}"
    if BEGIN in text:
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + f"\n\n## Benchmarks\n\n{section}\n"
    path.write_text(text)


def readme_section(path: Path = README) -> str:
    text = path.read_text()
    start = text.index(BEGIN) + len(BEGIN) + 1
    return text[start : text.index(END)]
