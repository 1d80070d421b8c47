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

    A fraction is rounded up, so no freeze happens before any training at all.

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
    return max(1, math.ceil(value * total))


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
