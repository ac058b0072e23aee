"""Benchmarks record their best times here; summary tests turn them into ratios of one run."""

RESULTS: dict[str, float] = {}


def record(key: str, benchmark) -> None:
    RESULTS[key] = benchmark.stats.stats.min
