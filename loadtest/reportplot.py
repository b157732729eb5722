"""PNG of a run over time from Locust's `<prefix>_stats_history.csv` (written with
--csv-full-history): TTFT and inter-token-gap percentiles per route, and active users.

Locust's per-entry percentiles in that file cover a sliding window of the last ~10 s.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a CI host
import matplotlib.pyplot as plt

# (request_type, percentile columns) drawn in one panel each.
PANELS = [
    ("ttft_ms", ("50%", "95%")),
    ("itl_ms", ("50%", "99%")),
    ("generator_loop_lag_ms", ("50%", "100%")),  # the generator's own stalls: is the plot valid?
]


def read_history(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as source:
        return list(csv.DictReader(source))


def plot_history(history_csv: Path, png: Path) -> Path:
    rows = read_history(history_csv)
    if not rows:
        raise ValueError(f"{history_csv} has no rows")
    start = int(rows[0]["Timestamp"])
    figure, axes = plt.subplots(len(PANELS) + 1, 1, figsize=(10, 11), sharex=True)
    for axis, (metric, columns) in zip(axes, PANELS, strict=False):
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for row in rows:
            if row["Type"] != metric:
                continue
            for column in columns:
                value = row[column]
                if value not in ("", "N/A", "0"):
                    label = f"{row['Name']} p{column.rstrip('%')}"
                    series[label].append((int(row["Timestamp"]) - start, float(value)))
        for label, points in sorted(series.items()):
            axis.plot(*zip(*points, strict=True), label=label)
        axis.set_ylabel(f"{metric} (ms)")
        axis.grid(True, alpha=0.3)
        if series:
            axis.legend(fontsize="small")
    users = [
        (int(r["Timestamp"]) - start, int(r["User Count"]))
        for r in rows
        if r["Name"] == "Aggregated"
    ]
    if users:
        axes[-1].plot(*zip(*users, strict=True), color="black")
    axes[-1].set_ylabel("active users")
    axes[-1].set_xlabel("seconds since start")
    axes[-1].grid(True, alpha=0.3)
    figure.suptitle("streamgate load test: first token, inter-token gap, generator lag, users")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return png
