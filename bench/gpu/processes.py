"""Running gpu_check's steps: each in its own process group under a timeout, its rows read back
from the JSON-lines file it appends to; the wheels and the environment the report names."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"  # on the steps' PYTHONPATH: each runs as ``python -m gpu``
KILL_GRACE_S = 5


def child_env(dry_run: bool, wheel_dir: str | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, also on a GPU machine
    else:
        env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [wheel_dir, str(BENCH), env.get("PYTHONPATH")]))
    return env


def install_wheels(folder: Path, target: Path) -> tuple[list[str], str | None]:
    """Install the folder's wheels into ``target``, skipping any whose version is installed
    already; returns (what was installed, error)."""
    import importlib.metadata as md

    wheels = []
    for w in sorted(folder.glob("*.whl")):
        name, version = (w.name.split("-") + ["", ""])[:2]
        try:
            have = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            have = None
        if have != version:
            wheels.append(w)
    if not wheels:
        return [], None
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
           *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return [w.name for w in wheels], last_line(done.stderr + done.stdout) or f"pip exit {done.returncode}"
    return [w.name for w in wheels], None


def last_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def run_step_process(name: str, rows_file: Path, log_file: Path, env: dict, timeout: float, dry_run: bool,
              work: Path) -> tuple[str, str | None]:
    """Run one step in its own process group; returns (status, error)."""
    deadline = time.time() + timeout - KILL_GRACE_S
    cmd = [sys.executable, "-m", "gpu", "--step", name, "--rows", str(rows_file),
           "--work", str(work), "--deadline", f"{deadline:.1f}"] + (["--dry-run"] if dry_run else [])
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return "timeout", f"timed out after {timeout:.0f} s"
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything the step left running must not overlap the next
        except ProcessLookupError:
            pass
    if rc == 0:
        return "ok", None
    raised = [r for r in read_rows(rows_file) if r.get("error")]
    if rc == 1 and raised:
        return "failed", f"{len(raised)} row(s) raised; {raised[0]['name']}: {raised[0]['error']}"[:300]
    text = log_file.read_text(errors="replace")
    errors = [l for l in text.splitlines() if "Error" in l or "error" in l]
    return ("failed" if rc == 1 else "crashed"), f"exit {rc}: {last_line(errors[-1] if errors else text)}"[:300]


def kill_group(proc: subprocess.Popen) -> None:
    # The step's process group, which this driver created: also ends pytest's or torchrun's children.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and "name" in row:
            rows.append(row)
    return rows


def environment(dry_run: bool, wheel_dir: str | None) -> dict:
    import importlib.metadata as md

    def version(pkg):  # as the steps see it: the wheels folder comes first on their path
        found = next(iter(md.distributions(name=pkg, path=[wheel_dir])), None) if wheel_dir else None
        try:
            return found.version if found else md.version(pkg)
        except md.PackageNotFoundError:
            return None

    card = driver = None
    if not dry_run:
        import torch

        card = torch.cuda.get_device_name()
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
            driver = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    return {"card": card or "none (dry run, CPU interpreter)", "driver": driver, "torch": version("torch"),
            "triton": version("triton"), "timm": version("timm")}


def cuda_available() -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch

        return torch.cuda.is_available()
