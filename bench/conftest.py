"""Benchmarks run the Triton kernels through the interpreter when no GPU is present.

A summary test that takes the ``bench_report`` fixture has what it prints written to
docs/bench/<bench>_<cpu|cuda>.md with the date, the machine, the command and whether its targets
held: the README quotes those files, never a number typed by hand.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from results import write_report  # after TRITON_INTERPRET: it imports dimap_fast, which imports triton

QUICK = os.environ.get("BENCH_QUICK") == "1"  # a smoke run: its figures are not worth keeping


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.call_report = report


@pytest.fixture
def bench_report(request, capsys):
    yield
    printed = capsys.readouterr().out
    with capsys.disabled():
        sys.stdout.write(printed)
    call = getattr(request.node, "call_report", None)
    # Only a summary of its whole file is kept: run alone, it has no rows to report.
    ran = {i.originalname for i in request.session.items if i.module is request.module}
    whole_file = ran == {n for n in vars(request.module) if n.startswith("test_")}
    if QUICK or call is None or call.skipped or not whole_file:
        return
    path = Path(request.node.fspath)
    name = f"{path.stem.removeprefix('test_bench_')}_{'cuda' if torch.cuda.is_available() else 'cpu'}"
    doc = (request.module.__doc__ or name).strip()
    title = doc.splitlines()[0].rstrip(".")
    verdict = ("Targets: all held." if call.passed else
               f"Targets: NOT all held: {str(call.longrepr.reprcrash.message).splitlines()[0]}")
    write_report(name, title, f"{doc}\n\n{verdict}\n\n```\n{printed.strip()}\n```",
                 f"pytest -s bench/{path.name}")
