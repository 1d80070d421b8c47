"""Writing files so that nobody ever reads half of one: a unique temporary name beside the target, then a rename."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` for a unique temporary file next to ``path``, then atomically rename it to ``path``.

    The temporary file has ``path``'s own name, inside a unique hidden folder beside it (archives such as
    TorchScript's name their root folder after the file). Concurrent writers each use their own temporary folder;
    readers see the old file or a complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    folder.mkdir()
    tmp = folder / path.name
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        folder.rmdir()
    return path


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
