"""SIGTERM while lightning-qat's own code runs (the preflight in ``setup``, the end of fit) ends the run, non-zero."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from lightning_qat.exceptions import EvaluationInterrupted


@contextlib.contextmanager
def sigterm_raises(where: str) -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`~lightning_qat.EvaluationInterrupted` naming ``where``.

    The handler installed before runs first (Lightning's notifier, a cluster's requeue). Lightning's evaluation
    Trainers started inside the block keep this handler in force (they add theirs in front of it), so the signal is
    never taken by a nested Trainer and forgotten: the run ends non-zero instead of finishing as if nothing happened.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        raise EvaluationInterrupted(f"SIGTERM received during {where}")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
