"""One picture per scenario comparing the systems, drawn from the results dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen: draw to a file

import matplotlib.pyplot as plt

COLOURS = {
    "worker": "tab:blue",
    "worker-unpartitioned": "tab:purple",
    "dramatiq": "tab:orange",
    "celery": "tab:green",
}
CPU_GROUPS = ("system", "broker", "postgres", "provider", "publisher")


def _cpu_panel(axis: Any, systems: dict[str, Any]) -> None:
    """Stacked CPU seconds per 1,000 messages by process group."""
    names = list(systems)
    bottom = [0.0] * len(names)
    for group in CPU_GROUPS:
        values = [systems[n]["median"].get(f"cpu_{group}_per_1000", 0.0) for n in names]
        axis.bar(names, values, bottom=bottom, label=group)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axis.set_title("CPU s per 1,000 messages, by process")
    axis.legend(fontsize="small")


def _bars(axis: Any, systems: dict[str, Any], keys: list[tuple[str, str]], title: str) -> None:
    names = list(systems)
    width = 0.8 / max(len(keys), 1)
    for index, (key, label) in enumerate(keys):
        values = [systems[n]["median"].get(key) or 0.0 for n in names]
        xs = [x + index * width for x in range(len(names))]
        axis.bar(xs, values, width=width, label=label)
    axis.set_xticks([x + width * (len(keys) - 1) / 2 for x in range(len(names))], names)
    axis.set_title(title)
    axis.legend(fontsize="small")


def plot_scenario(name: str, scenario: dict[str, Any], path: Path) -> None:
    systems = scenario["systems"]
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(systems)
    rates = [systems[n]["median"].get("msgs_per_s", 0.0) for n in names]
    left.bar(names, rates, color=[COLOURS.get(n, "tab:gray") for n in names])
    for x, n in enumerate(names):
        if str(systems[n]["median"].get("bottleneck", "")).startswith("bench-bound"):
            left.annotate("bench-bound", (x, rates[x]), ha="center", va="bottom")
    left.set_title("messages/s (end to end)")
    _cpu_panel(middle, systems)
    if name == "backlog_memory":
        for n in names:
            samples = systems[n]["runs"][0].get("rss_samples") or []
            right.plot([t for t, _ in samples], [mb for _, mb in samples], label=n,
                       color=COLOURS.get(n))  # fmt: skip
        right.set_xlabel("seconds into the drain")
        right.set_ylabel("RSS of the system's processes, MB")
        right.set_ylim(bottom=0)
        right.legend()
        right.set_title("memory over the drain")
    elif "recovery_to_last_backlog_s" in systems[names[0]]["median"]:
        keys = [("fresh_p50_ms", "fresh p50 ms"), ("fresh_p99_ms", "fresh p99 ms")]
        if "healthy_p50_ms" in systems[names[0]]["median"]:
            keys = [("healthy_p50_ms", "healthy groups p50 ms"),
                    ("healthy_p99_ms", "healthy groups p99 ms")]  # fmt: skip
        _bars(right, systems, keys, "latency, publish → provider accepted")
        right.set_yscale("symlog")
        twin = right.twinx()
        twin.plot(names, [systems[n]["median"].get("recovery_to_last_backlog_s") or 0.0
                          for n in names], "kD", label="recovery → last backlog s")  # fmt: skip
        twin.set_ylabel("recovery → last backlog message, s")
        twin.set_ylim(bottom=0)
    elif "p50_ms" in systems[names[0]]["median"]:
        _bars(right, systems, [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")],
              "latency, publish → provider accepted")  # fmt: skip
    else:
        _bars(right, systems, [("peak_rss_mb", "peak RSS MB")], "peak RSS of the system, MB")
    figure.suptitle(f"{name}: {scenario['about']} ({scenario['messages']} messages)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot(results: dict[str, Any], directory: Path, prefix: str = "") -> list[Path]:
    paths = []
    for name, scenario in results["scenarios"].items():
        if scenario["systems"]:
            path = directory / f"{prefix}{name}.png"
            plot_scenario(name, scenario, path)
            paths.append(path)
    return paths
