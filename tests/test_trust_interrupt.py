"""A sweep stopped mid-run (SIGKILL, SIGINT, SIGTERM) loses nothing, and a rerun finishes the same bytes.

The sweep runs as its own process (``python -m dimap_fast.cli sweep``) over two small checkpoints,
2 methods x 3 ratios (12 outputs, ~0.1 s each); it is stopped as soon as its first output appears.
A kill -9 can land in the middle of a write, which leaves a temporary file; the test plants one
(of a dead process) so that the rerun must clean it up every time, not only when the timing falls so.
"""

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from statedicts import make_state

from dimap_fast.cli import main
from dimap_fast.atomic import remove_stale_temps
from dimap_fast.io.checkpoint import load_pruned

N = 192
SHAPES = {
    "layers.0.blocks.0.attn.qkv.weight": (3 * N, N), "layers.0.blocks.0.attn.proj.weight": (N, N),
    "layers.0.blocks.0.mlp.fc1.weight": (4 * N, N), "layers.0.blocks.0.mlp.fc2.weight": (N, 4 * N),
}
RATIOS = "0.2,0.4,0.6"
METHODS = "dimap,uniform"
TOTAL = 12
SIGNALS = [signal.SIGKILL, signal.SIGINT, signal.SIGTERM]


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupt")
    sources = []
    for i in range(2):
        path = d / f"src{i}.safetensors"
        save_file(make_state(SHAPES, seed=i), str(path))
        sources.append(str(path))
    clean = d / "clean"
    assert main(["sweep", *sources, "--ratios", RATIOS, "--methods", METHODS, "--out-dir", str(clean)]) == 0
    expected = {p.name: sha(p) for p in clean.glob("*.safetensors")}
    assert len(expected) == TOTAL
    return d, sources, expected


def sweep_args(sources, out):
    return ["sweep", *sources, "--ratios", RATIOS, "--methods", METHODS, "--out-dir", str(out)]


def stop_sweeps(sources, outs):
    """Start one sweep process per (signal, folder); send each its signal as soon as its first output exists.

    The processes run side by side (their start-up, mostly importing torch, dominates the time).
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = {sig: subprocess.Popen([sys.executable, "-m", "dimap_fast.cli", *sweep_args(sources, out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                   preexec_fn=_default_sigint)
             for sig, out in outs.items()}
    waiting = dict(outs)
    deadline = time.monotonic() + 180
    while waiting:
        for sig, out in list(waiting.items()):
            if out.is_dir() and any(out.glob("*.safetensors")):
                procs[sig].send_signal(sig)
                del waiting[sig]
            else:
                assert procs[sig].poll() is None, procs[sig].stderr.read().decode()
        assert time.monotonic() < deadline, "a sweep wrote nothing in 180 s"
        time.sleep(0.002)
    results = {}
    for sig, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        results[sig] = (proc.returncode, err.decode())
    return results


def _default_sigint():
    # A test run started in the background (nohup, `cmd &` in a script) ignores SIGINT, and children
    # inherit that: Python then never turns SIGINT into KeyboardInterrupt. Ctrl-C is what is tested.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def stopped(setup, tmp_path_factory):
    d, sources, expected = setup
    outs = {sig: tmp_path_factory.mktemp(sig.name) / "out" for sig in SIGNALS}
    return outs, stop_sweeps(sources, outs)


def check_outputs(out, expected):
    """Every output there is complete (loads, and is byte for byte the clean run's); nothing else counts."""
    done = sorted(out.glob("*.safetensors"))
    for path in done:
        state, masks, meta = load_pruned(path)
        assert len(masks) == 4 and len(state) == 4 and meta["format"] == "dimap-fast/1"
        assert sha(path) == expected[path.name], f"{path.name} differs from the clean run"
    if (out / "summary.csv").exists():
        rows = list(csv.DictReader((out / "summary.csv").open()))
        assert {os.path.basename(r["output"]) for r in rows} <= {p.name for p in done}
    return done


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_stopped_sweep_loses_nothing_and_rerun_finishes_identically(setup, stopped, capsys, sig):
    d, sources, expected = setup
    before = [sha(Path(p)) for p in sources]
    outs, results = stopped
    out = outs[sig]
    code, err = results[sig]
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:  # handled: the temporary file of the output being written is removed, and the user told
        assert code == (130 if sig == signal.SIGINT else 143), err
        assert "interrupted; finished outputs are complete" in err
        assert not list(out.glob(".*.tmp")), "a temporary file was left"
    done = check_outputs(out, expected)
    assert 1 <= len(done) < TOTAL, "the sweep was not stopped mid-run"
    if sig == signal.SIGKILL:  # what kill -9 can leave in the middle of a write: a temporary file of a dead process
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        missing = sorted(set(expected) - {p.name for p in done})[0]
        (out / f".{missing}.{dead.pid}.abcd1234.tmp").write_bytes(b"half a file")
        (out / f".summary.csv.{dead.pid}.abcd1234.tmp").write_bytes(b"source,meth")
    capsys.readouterr()
    assert main(sweep_args(sources, out)) == 0  # the rerun picks up where it stopped
    printed = capsys.readouterr().out
    assert printed.count("kept (exists)") == len(done)
    assert not list(out.glob(".*.tmp"))
    assert len(check_outputs(out, expected)) == TOTAL
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == TOTAL and all(r["MLP-M"] not in ("", None) for r in rows[: len(done) - 1])
    assert [sha(Path(p)) for p in sources] == before  # the inputs are never modified


def test_separate_processes_write_identical_bytes(setup, stopped):
    """Determinism across processes: each stopped sweep ran in its own process (own hash seed, own
    allocations); the first output of each is byte for byte the same, and the same as this process wrote."""
    _, _, expected = setup
    outs, _ = stopped
    first = sorted(expected)[0]  # every sweep writes it first
    digests = {sig.name: sha(out / first) for sig, out in outs.items()}
    assert set(digests.values()) == {expected[first]}, digests
    with safe_open(str(outs[signal.SIGKILL] / first), "pt") as f:  # nothing that varies from run to run is recorded
        assert set(f.metadata()) == {"format", "method", "ratio", "source", "timm_model", "pattern"}  # block_size: block patterns only


def test_stale_temporary_files_of_dead_processes_go_live_ones_stay(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        name = "m__dimap__r0.5.pruned.safetensors"
        stale = tmp_path / f".{name}.{dead.pid}.abcd1234.tmp"
        busy = tmp_path / f".{name}.{live.pid}.abcd1234.tmp"
        foreign = tmp_path / ".other.safetensors.1.x.tmp"  # not an output of this run: left alone
        unrelated = tmp_path / ".notes.tmp"
        for p in (stale, busy, foreign, unrelated):
            p.write_bytes(b"x")
        assert remove_stale_temps(tmp_path, [name]) == [stale]
        assert not stale.exists() and busy.exists() and foreign.exists() and unrelated.exists()
    finally:
        live.kill()
        live.wait()


def test_damaged_existing_output_is_written_again_not_kept(setup, tmp_path, capsys):
    """A file under an output's name that does not read as that output is never taken for a finished one."""
    d, sources, expected = setup
    out = tmp_path / "out"
    out.mkdir()
    name = sorted(expected)[0]
    (out / name).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # a valid, empty safetensors: no metadata
    assert main(sweep_args(sources, out)) == 2
    assert "exists but was not written by this sweep" in capsys.readouterr().err
    (out / name).write_bytes(b"truncated")  # unreadable: written again
    assert main(sweep_args(sources, out)) == 0
    assert len(check_outputs(out, expected)) == TOTAL


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")], ids=["interrupt", "disk full"])
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, failure):
    import torch

    import dimap_fast.atomic
    from dimap_fast import DimapError
    from dimap_fast.io.checkpoint import save_atomic

    out = tmp_path / "x.safetensors"
    out.write_bytes(b"the old file")

    def half_write(path, data):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise failure

    monkeypatch.setattr(dimap_fast.atomic, "write_file", half_write)
    expected = KeyboardInterrupt if failure is KeyboardInterrupt else DimapError
    with pytest.raises(expected) as info:
        save_atomic(out, {"w": torch.ones(2)})
    if expected is DimapError:
        assert str(info.value) == f"cannot write {out} (No space left on device): check the free space and permissions"
    assert out.read_bytes() == b"the old file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_interrupt_right_after_the_temporary_file_appears_leaves_nothing(tmp_path, monkeypatch):
    # the narrowest window: the file exists, nothing has been written yet
    import dimap_fast.atomic as io

    real_close = os.close

    def interrupted_close(fd):
        real_close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "close", interrupted_close)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(tmp_path / "out.safetensors"):
            pass
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


BIG = 1536  # ~140 MB per output: its write lasts long enough to be caught in the middle


def _in_progress(out: Path) -> list[os.DirEntry]:
    """Files in ``out`` that are neither an output nor summary.csv and already hold bytes."""
    with os.scandir(out) as entries:
        return [e for e in entries if not (e.name == "summary.csv" or e.name.endswith(".safetensors")
                                           and not e.name.startswith(".")) and e.stat().st_size > 0]


def test_kill_mid_write_then_rerun_leaves_only_the_outputs(tmp_path):
    """SIGKILL while a checkpoint's bytes are being written; a rerun leaves the folder holding
    nothing but the outputs and summary.csv (safetensors' own writer used to leave a full-size
    .tmpXXXXXX of its own there)."""
    src = tmp_path / "big.safetensors"
    shapes = {k: (s[0] // N * BIG, s[1] // N * BIG) for k, s in SHAPES.items()}
    save_file(make_state(shapes, seed=3), str(src))
    out = tmp_path / "out"
    args = ["sweep", str(src), "--ratios", "0.3,0.5", "--methods", "dimap", "--out-dir", str(out)]
    caught = []
    for _ in range(5):  # a write is caught in the middle by polling; retry if one slipped by
        proc = subprocess.Popen([sys.executable, "-m", "dimap_fast.cli", *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline and not caught:
            caught = out.is_dir() and _in_progress(out)
            if caught:
                proc.kill()
            time.sleep(0.0005)
        proc.wait(timeout=60)
        if caught:
            break
        for p in out.glob("*"):
            p.unlink()
    assert caught, "no write was ever caught in the middle: make the outputs larger"
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.csv"] + [p.name for p in out.glob("*.safetensors") if not p.name.startswith(".")])
    assert len(list(out.glob("*.safetensors"))) == 2
