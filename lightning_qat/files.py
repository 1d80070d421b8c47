"""Writing files so that nobody ever reads half of one: a unique temporary name beside the target, then a rename."""

from __future__ import annotations

import glob
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` for a unique temporary file next to ``path``, then atomically rename it to ``path``.

    The temporary file has ``path``'s own name, inside a unique hidden folder beside it (archives such as
    TorchScript's name their root folder after the file). Concurrent writers each use their own temporary folder;
    readers see the old file or a complete new one. Temporary folders that writers on this machine left when they
    were killed are removed first (the folder's name carries the host and process id).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    folder = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    folder.mkdir()
    tmp = folder / path.name
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        folder.rmdir()
    return path


_HOST = socket.gethostname().replace(".", "-")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of :func:`write_atomic` for ``path`` whose writer, on this host, is gone; returns them.

    Another host's temporaries (a shared file system) are left alone: their process cannot be checked from here.
    """
    path = Path(path)
    removed = []
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        host, _, rest = leftover.name[len(path.name) + 2 :].partition(".")
        pid = rest.partition(".")[0]
        if host != _HOST or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            if leftover.is_dir():
                for inner in leftover.iterdir():
                    inner.unlink(missing_ok=True)
                leftover.rmdir()
            else:
                leftover.unlink(missing_ok=True)
        except FileNotFoundError:  # another writer cleaned it up first
            continue
        removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` for a text file."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def check_writable(directory: str | os.PathLike, what: str) -> None:
    """Create ``directory`` if needed and write and remove a probe file in it.

    Raises:
        ValueError: naming ``what`` (the setting), the directory and the OS error.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".lightning_qat_probe.{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{what}={str(directory)!r} is not a writable directory ({err}); choose another.") from err


def next_version_dir(root: str | os.PathLike) -> Path:
    """Create and return ``root/version_N`` for the first N not taken (as Lightning's loggers number runs)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        candidate = root / f"version_{n}"
        try:
            candidate.mkdir()
        except FileExistsError:
            n += 1
            continue
        return candidate


CLAIM = ".lightning_qat.claim"


def claim(directory: str | os.PathLike) -> Path:
    """Claim ``directory`` for this process: an exclusive file that a second run writing there finds.

    A claim left by a process of this host that is gone (a killed run) is taken over; one of another host is not
    (its process cannot be checked from here: the error names the file to delete once that run is over).

    Raises:
        FileExistsError: naming the run that holds ``directory``.
    """
    path = Path(directory) / CLAIM
    mine = {"host": _HOST, "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None and holder.get("host") == _HOST and not _alive(int(holder.get("pid", -1))):
                path.unlink(missing_ok=True)  # a killed run's leftover
                continue
            if holder is None and path.exists():
                time.sleep(0.1)  # being written right now: read it again
                continue
            who = f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder else "?"
            raise FileExistsError(
                f"{directory} is being written by another run ({who}; {path}). Pass another save_dir; delete that "
                "file only if that run is over."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        return path
    raise FileExistsError(f"{directory}: the claim {path} kept changing; another run is starting there.")


def release(path: str | os.PathLike) -> None:
    """Remove a claim made by :func:`claim` in this process (another process's claim is left alone)."""
    holder = _holder(Path(path))
    if holder is not None and holder.get("host") == _HOST and holder.get("pid") == os.getpid():
        Path(path).unlink(missing_ok=True)


def _holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None
