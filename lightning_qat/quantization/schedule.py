"""When to freeze BatchNorm statistics and observers during QAT (by epoch or by optimizer step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Interval = Literal["epoch", "step"]


def check_after(name: str, value: int | float | None) -> None:
    """Validate a ``*_after`` argument: ``None``, an int >= 0, or a float strictly between 0 and 1.

    Raises:
        ValueError: naming the argument, the value and the accepted forms.
    """
    if value is None:
        return
    ok_int = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    ok_frac = isinstance(value, float) and 0.0 < value < 1.0
    if not (ok_int or ok_frac):
        raise ValueError(
            f"{name}={value!r} is invalid; use None (never), an int >= 0 (absolute epoch/step count) "
            "or a float in (0, 1) (fraction of max_epochs/max_steps)."
        )


def resolve_after(name: str, value: int | float | None, total: int | None, interval: str) -> int | None:
    """Turn a ``*_after`` value into an absolute epoch/step index (``None`` = never).

    A fraction is rounded up, so no freeze happens before any training at all, and capped at the last epoch/step,
    so it always happens (``0.75`` of 2 epochs freezes at the start of epoch 1, not after the run).

    Raises:
        ValueError: for a fraction when the trainer has no finite length in ``interval`` units.
    """
    if value is None or isinstance(value, int):
        return value
    if total is None or total < 0 or not math.isfinite(total):
        limit = "max_epochs" if interval == "epoch" else "max_steps (or max_epochs)"
        raise ValueError(
            f"{name}={value} is a fraction, but the trainer has no finite {limit}; set {limit} or give an "
            "absolute int count."
        )
    return min(max(1, math.ceil(value * total)), max(1, total - 1))


def build_schedule(
    interval: Interval,
    freeze_bn_after: int | float | None,
    freeze_observers_after: int | float | None,
    max_epochs: int | None,
    max_steps: int,
    stepping_batches: float,
) -> tuple[FreezeSchedule, list[str], list[str]]:
    """The schedule of a run, with what to tell the user: ``(schedule, notes, warnings)``.

    Fractions of epochs that cannot work become fractions of optimizer steps, said in a note: a single epoch
    (``max_epochs=1``: an epoch schedule would freeze nothing) and ``max_steps`` without ``max_epochs``. An absolute
    value the run never reaches is a warning naming the value, what it resolves to and the run's length.
    """
    values = [v for v in (freeze_bn_after, freeze_observers_after) if v is not None]
    all_fractions = bool(values) and all(isinstance(v, float) for v in values)
    steps = max_steps if max_steps > 0 else stepping_batches
    notes: list[str] = []
    epochs_unknown = max_epochs is None or max_epochs < 0
    if interval == "epoch" and all_fractions and (epochs_unknown or max_epochs == 1) and math.isfinite(steps):
        why = f"max_steps={max_steps} without max_epochs" if epochs_unknown else "max_epochs=1"
        notes.append(f"QAT: {why}: the freeze fractions apply to the run's {int(steps)} optimizer steps instead.")
        interval = "step"
    total = max_epochs if interval == "epoch" else steps
    total = int(total) if total is not None and total >= 0 and math.isfinite(total) else None
    schedule = FreezeSchedule(
        interval,
        resolve_after("freeze_bn_after", freeze_bn_after, total, interval),
        resolve_after("freeze_observers_after", freeze_observers_after, total, interval),
    )
    warnings = [
        f"QAT: {name}={value!r} resolves to {interval} {at}, which a run of {total} {interval}s never reaches: "
        "nothing is frozen by it. Use a smaller value or a fraction."
        for name, value, at in (
            ("freeze_bn_after", freeze_bn_after, schedule.bn_at),
            ("freeze_observers_after", freeze_observers_after, schedule.observers_at),
        )
        if at is not None and total is not None and at >= total
    ]
    return schedule, notes, warnings


@dataclass
class FreezeSchedule:
    """Absolute thresholds: BN statistics / observers are frozen once the counter reaches them."""

    interval: str
    bn_at: int | None
    observers_at: int | None

    def due(self, counter: int) -> tuple[bool, bool]:
        """``(freeze_bn, freeze_observers)`` for an epoch or step ``counter``."""
        return (
            self.bn_at is not None and counter >= self.bn_at,
            self.observers_at is not None and counter >= self.observers_at,
        )
