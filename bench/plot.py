"""The PNG next to the JSON report: points/s and request p99 against the writer count K.

Owns the picture only: one line per transport, the direct ClickHouse insert (baseline) as a
dashed reference line, overload steps as their own line; log-scaled K axis. Uses matplotlib's
non-interactive Agg backend (no display). Must not import anyio, must do no I/O but the file.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on a server

import matplotlib.pyplot as plt

from bench.report import Report, WorkloadResult


def _series(results: list[WorkloadResult]) -> dict[str, list[WorkloadResult]]:
    lines: dict[str, list[WorkloadResult]] = {}
    for result in results:
        label = "baseline (direct insert)" if result.workload == "baseline" else (
            f"{result.transport} overload" if result.workload == "overload" else result.transport)
        lines.setdefault(label, []).append(result)
    return {label: sorted(rs, key=lambda r: r.writers) for label, rs in lines.items()}


def write_plot(report: Report, out_dir: Path, stem: str) -> Path | None:
    """Write `<stem>.png`; None when there is no baseline or ingest result to draw."""
    lines = _series([*report.baseline, *report.ingest, *report.overload])
    if not lines:
        return None
    figure, (rate_axes, p99_axes) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, results in lines.items():
        style = "--" if label.startswith("baseline") else "-"
        ks = [r.writers for r in results]
        rate_axes.plot(ks, [r.points_per_s for r in results], style, marker="o", label=label)
        p99 = [r.latency_ms.p99 if r.latency_ms.p99 is not None else float("nan")
               for r in results]
        p99_axes.plot(ks, p99, style, marker="o", label=label)
    for axes, title, unit in ((rate_axes, "throughput", "points/s (acknowledged)"),
                              (p99_axes, "request latency p99", "ms")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("writers K")
        axes.set_ylabel(unit)
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    p99_axes.set_yscale("log")
    figure.suptitle(f"MLRun bench - {report.target.description}"[:110], fontsize=9)
    figure.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
