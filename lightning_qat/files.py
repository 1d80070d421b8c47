"""Writing files so that nobody ever reads half of one: a unique temporary name beside the target, then a rename."""

from __future__ import annotations

import glob
import os
import socket
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
