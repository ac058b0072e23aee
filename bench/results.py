"""Benchmarks record their best times here; summary tests turn them into ratios of one run and
write what they measured to docs/bench/, where the README quotes it."""

import datetime
import os
from pathlib import Path

RESULTS: dict[str, float] = {}
REPORTS = Path(__file__).resolve().parents[1] / "docs" / "bench"


def record(key: str, benchmark) -> None:
    RESULTS[key] = benchmark.stats.stats.min


def write_report(name: str, title: str, body: str, command: str) -> str:
    """docs/bench/<name>.md: what a bench measured, with its date, machine and command."""
    from dimap_fast.atomic import write_text_atomic
    from dimap_fast.host import describe

    REPORTS.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    load = os.getloadavg()[0]  # above the core count, other work shared the machine and timings swing
    path = write_text_atomic(REPORTS / f"{name}.md", f"# {title}\n\nMeasured {today} on {describe()}; load "
                             f"average {load:.1f} at the end.\nMade by `{command}`.\n\n{body.rstrip()}\n")
    return str(path)
