"""Atomic writes, the one way every output and cache file is written.

A file goes to a temporary file beside the target, ``.NAME.PID.XXXXXXXX.tmp``, is fsynced and
renamed over it, so a crash leaves either the old file or the new one, never half of one. An
interrupted write removes its temporary file; one left by a killed process (kill -9, power loss)
is recognised by its dead PID and removed by the next run that writes NAME.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import warnings
from pathlib import Path

from .errors import DimapError, short_reason

TEMP_SUFFIX = ".tmp"


def public_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(out):
    """Yield a temporary path beside ``out``; on success fsync it and rename it over ``out``.

    On any failure or interruption the temporary file is removed and ``out`` is left as it was.
    """
    out = Path(out)
    tmp = str(out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    refused = False  # the file could not be made: whatever has its name is not ours to remove
    # One guard from the file's creation to its rename: a Ctrl-C landing right after the file
    # appears (even inside os.open) is caught here and the file removed.
    try:
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            refused = True
            raise DimapError(f"cannot write in {out.parent} ({short_reason(exc)}): choose another output folder") from None
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, public_mode())  # the file was made 0600; outputs get the usual umask
        os.replace(tmp, out)
    except BaseException as exc:
        if not refused:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise DimapError(f"cannot write {out} ({short_reason(exc)}): check the free space and permissions") from None
        raise
    fsync_dir(out.parent)


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temps(folder, names) -> list[Path]:
    """Remove the temporary files of ``names`` that a killed run left in ``folder``.

    A temporary file is ours when it reads ``.NAME.PID.XXXXXXXX.tmp`` with NAME in ``names``; it is
    stale when no process PID is alive (or PID is this process, which calls this before writing).
    Files of live processes, and anything else, are left alone.
    """
    names = set(names)
    removed = []
    pattern = f".{glob.escape(next(iter(names)))}.*{TEMP_SUFFIX}" if len(names) == 1 else f".*{TEMP_SUFFIX}"
    for path in Path(folder).glob(pattern):
        parts = path.name[1:-len(TEMP_SUFFIX)].rsplit(".", 2)  # NAME, PID, random part
        if len(parts) != 3 or parts[0] not in names or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def write_text_atomic(out, text: str) -> Path:
    """Write a text file (summary.csv, a report) atomically; a DimapError says why it could not."""
    return write_bytes_atomic(out, text.encode())


def write_bytes_atomic(out, data: bytes) -> Path:
    out = Path(out)
    remove_stale_temps(out.parent, [out.name])
    with atomic_path(out) as tmp:
        write_file(tmp, data)
    return out


def write_file(path, data: bytes) -> None:
    """Where every atomic write puts its bytes (the interruption tests break it mid-write)."""
    with open(path, "wb") as f:
        f.write(data)


def save_cache(path, text: str, what: str) -> bool:
    """Write a cache file (measured choices) atomically, creating its folder; where that fails,
    warn that ``what`` will be measured again (a cache is never worth failing for)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
        return True
    except (OSError, DimapError) as err:
        warnings.warn(f"could not save {what} to {path} ({err}); it will be measured again", stacklevel=3)
        return False
