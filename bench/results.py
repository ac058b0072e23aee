"""Benchmarks record their best times here; summary tests turn them into ratios of one run."""

RESULTS: dict[str, float] = {}


def record(key: str, benchmark) -> None:
    RESULTS[key] = benchmark.stats.stats.min


def write_report(name: str, title: str, body: str, command: str) -> str:
    """docs/bench/<name>.md: what a bench measured, with its date, machine and command (the README quotes it)."""
    import datetime
    from pathlib import Path

    from dimap_fast.checkpoint import write_text_atomic
    from dimap_fast.host import describe

    path = Path(__file__).resolve().parents[1] / "docs" / "bench" / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    import os

    today = datetime.date.today().isoformat()
    load = os.getloadavg()[0]  # above the core count, other work shared the machine and timings swing
    write_text_atomic(path, f"# {title}\n\nMeasured {today} on {describe()}; load average {load:.1f} at the end.\n"
                            f"Made by `{command}`.\n\n{body.rstrip()}\n")
    return str(path)
