"""Benchmarks record their best times here; summary tests turn them into ratios of one run."""

RESULTS: dict[str, float] = {}


def record(key: str, benchmark) -> None:
    RESULTS[key] = benchmark.stats.stats.min


def write_report(name: str, title: str, body: str, command: str) -> str:
    """docs/bench/<name>.md: what a bench measured, with its date, machine and command (the README quotes it)."""
    import datetime
    from pathlib import Path

    from dimap_fast.io.checkpoint import write_text_atomic
    from dimap_fast.host import describe

    path = Path(__file__).resolve().parents[1] / "docs" / "bench" / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    write_text_atomic(path, f"# {title}\n\nMeasured {today} on {describe()}.\nMade by `{command}`.\n\n{body.rstrip()}\n")
    return str(path)
