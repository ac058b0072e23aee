"""What every step of the GPU check shares, and nothing else imports from here: the step's
context (dry run, deadline, work folder) and the rows it writes. A leaf: it imports no step."""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Ctx:
    dry: bool
    deadline: float
    work: Path
    parts: str | None = None

    def left(self) -> float:
        """Seconds until this step must be done."""
        return self.deadline - time.time()


class Cell:
    """What a ``Rows.row`` block measures: set ``value`` and optionally ``note``."""

    value = None
    note = None


def error_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


class Rows:
    """Rows appended to the step's JSON-lines file as they are measured: one write per row, so
    parallel parts can share the file and a step that is killed keeps what it measured."""

    def __init__(self, path):
        self.path = str(path)
        self.failed = False  # a non-optional row raised: the step reports "failed"

    def add(self, name: str, value, unit: str, note: str | None = None, error: str | None = None) -> None:
        row = {"name": name, "value": value, "unit": unit}
        if note:
            row["note"] = note
        if error:
            row["error"] = error
        self._write(row)
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {name} = {shown} {unit}" + (f"  ({note})" if note else "") + (f"  ERROR {error}" if error else ""),
              flush=True)

    def plan(self, names: list[str]) -> None:
        """Name the rows this step sets out to measure: the driver reports any it did not make
        (the step crashed or was killed first) as missing with the step's error."""
        self._write({"name": f"{names[0].split('.')[0]}.planned_rows", "value": len(names), "unit": "rows",
                     "planned": names})

    def _write(self, row: dict) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def row(self, name: str, unit: str, optional: bool = False):
        """``with rows.row(name, unit) as c: c.value = ...``: an exception becomes an error row."""
        cell = Cell()
        try:
            yield cell
        except Exception as exc:  # noqa: BLE001 - any failure of a measurement is that row's result
            traceback.print_exc()
            self.add(name, None, unit, cell.note, error_line(exc))
            if not optional:
                self.failed = True
        else:
            self.add(name, cell.value, unit, cell.note)
