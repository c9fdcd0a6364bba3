"""The benchmarks' figure: one PNG with a panel per scenario, drawn from the results dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen: draw to a file

import matplotlib.pyplot as plt


def plot(results: dict[str, Any], path: Path) -> None:
    figure, ((steady, recovery), (partial, backlog)) = plt.subplots(2, 2, figsize=(12, 8))

    medians = results["steady"]["medians"]
    names = list(medians)
    steady.bar(names, [medians[n]["msgs_per_s"] for n in names], color="tab:blue")
    for x, name in enumerate(names):
        ratio = medians[name]["vs_floor"]
        steady.annotate(f"×{ratio:.2f} floor", (x, medians[name]["msgs_per_s"]), ha="center",
                        va="bottom")  # fmt: skip
    steady.set_title("steady: end-to-end messages/s (median)")
    steady.set_ylabel("messages/s")

    rec = results["recovery_drain"]["median"]
    labels = ["fresh p50", "fresh p99", "backlog drain"]
    recovery.bar(labels, [rec["fresh_p50_s"], rec["fresh_p99_s"], rec["drain_s"]],
                 color=["tab:green", "tab:green", "tab:gray"])  # fmt: skip
    recovery.axhline(1.0, color="tab:red", linestyle="--", label="target: fresh p99 ≤ 1 s")
    recovery.set_title(f"recovery_drain: {rec['backlog']:.0f} backlog, {rec['fresh']:.0f} fresh")
    recovery.set_ylabel("seconds")
    recovery.legend()

    part = results["partial_outage"]["median"]
    groups = ["steady p50", "steady p99", "outage p50", "outage p99"]
    values = [part["baseline_p50_ms"], part["baseline_p99_ms"], part["healthy_p50_ms"],
              part["healthy_p99_ms"]]  # fmt: skip
    partial.bar(groups, values, color=["tab:blue", "tab:blue", "tab:orange", "tab:orange"])
    partial.set_title(
        f"partial_outage: healthy groups; {part['requests_per_delivered']:.2f} requests/delivered"
    )
    partial.set_ylabel("ms, publish → accepted")

    mem = results["backlog_memory"]
    times = [t for t, _ in mem["rss_samples"]]
    backlog.plot(times, [mb for _, mb in mem["rss_samples"]], color="tab:purple")
    backlog.set_title(f"backlog memory: {mem['messages']} messages, growth "
                      f"{mem['rss_growth_mb']:+.1f} MB")  # fmt: skip
    backlog.set_xlabel("seconds into the drain")
    backlog.set_ylabel("worker RSS, MB")
    backlog.set_ylim(bottom=0)

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
