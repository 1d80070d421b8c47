"""The freeze schedule as it runs: BatchNorm statistics, then observers, frozen once; observers paused for evaluations.

One object with the callback's freezing state. It records where each freeze really happened (``applied``), so the
report says the schedule the run followed, and :meth:`Freezing.finish` freezes what a fit stopped early (by
``EarlyStopping``, ``max_time`` or a schedule past the run's end) never reached, before the network is converted.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_qat.quantization import ao
from lightning_qat.quantization.prepare import freeze_batch_norm
from lightning_qat.quantization.schedule import FreezeSchedule, Interval, build_schedule
from lightning_qat.quantization.sync import all_reduce_batch_norm


class Freezing:
    """When BatchNorm statistics and observers freeze in this fit, whether they have, and where they did."""

    def __init__(self) -> None:
        self.schedule: FreezeSchedule | None = None
        self.bn_frozen = False
        self.observers_frozen = False
        self.applied: dict[str, str] = {}  # "bn" / "observers" -> where it happened ("epoch 2", "fit end ...")
        self._paused: list[dict[str, Any]] | None = None
        self._said_float = False
        self._held: list[nn.Module] = []  # standalone BatchNorms frozen: held in eval mode while training

    def reset(self) -> None:
        """A freshly prepared network: nothing frozen."""
        self.bn_frozen = self.observers_frozen = False
        self.applied = {}
        self._held = []

    def plan(
        self,
        trainer: pl.Trainer,
        interval: Interval,
        freeze_bn_after: int | float | None,
        freeze_observers_after: int | float | None,
    ) -> FreezeSchedule:
        """Resolve the schedule for this fit's length and say what it will do (or cannot)."""
        self.schedule, notes, warnings = build_schedule(
            interval,
            freeze_bn_after,
            freeze_observers_after,
            trainer.max_epochs,
            trainer.max_steps,
            trainer.estimated_stepping_batches,
        )
        for note in notes:
            rank_zero_info(note)
        for warning in warnings:
            rank_zero_warn(warning)
        return self.schedule

    def counter(self, trainer: pl.Trainer, interval: str) -> int | None:
        """The trainer's epoch or step count when the schedule counts in ``interval`` units, else ``None``."""
        if self.schedule is None or self.schedule.interval != interval:
            return None
        return trainer.current_epoch if interval == "epoch" else trainer.global_step

    def apply(self, network: nn.Module, counter: int) -> str:
        """Freeze what is due at ``counter`` (an epoch or step index) and has not been frozen; returns where it is."""
        assert self.schedule is not None
        freeze_bn, freeze_observers = self.schedule.due(counter)
        where = f"{self.schedule.interval} {counter}"
        if freeze_bn and not self.bn_frozen:
            self._freeze_bn(network, where)
            rank_zero_info(f"QAT: BatchNorm statistics frozen at {where}.")
        if freeze_observers and not self.observers_frozen:
            self._freeze_observers(network, where)
            rank_zero_info(f"QAT: observers frozen at {where}; quantization parameters fixed.")
        return where

    def finish(self, network: nn.Module, trainer: pl.Trainer) -> None:
        """Before converting: freeze what the schedule planned but a fit stopped early never reached, and say so.

        A fit stopped early is one a callback stopped (``trainer.should_stop``: ``EarlyStopping``, ``Timer``); a
        schedule beyond the run's planned length was refused with a warning at the start and stays unfrozen.
        """
        if self.schedule is None or not trainer.should_stop:
            return
        interval = self.schedule.interval
        stopped = f"{interval} {trainer.current_epoch if interval == 'epoch' else trainer.global_step}"
        late = []
        for name, at, frozen, freeze in (
            ("BatchNorm statistics", self.schedule.bn_at, self.bn_frozen, self._freeze_bn),
            ("observers", self.schedule.observers_at, self.observers_frozen, self._freeze_observers),
        ):
            if at is not None and not frozen:
                freeze(network, f"fit end (planned at {interval} {at}; the fit stopped at {stopped})")
                late.append(name)
        if late:
            rank_zero_warn(
                f"QAT: the fit stopped at {stopped}, before the schedule froze {' and '.join(late)}: frozen now, "
                "before the int8 conversion (the report's schedule says so). QAT trained without that phase; an "
                "earlier freeze_*_after (or EarlyStopping's patience beyond it) lets it train with them frozen."
            )

    def pause(self, network: nn.Module | None) -> None:
        """Observers off for an evaluation loop, which then leaves no trace in the quantization state.

        ``network`` is ``None`` when nothing is QAT-prepared (a float checkpoint's test): said once.
        """
        if network is None:
            if not self._said_float:
                self._said_float = True
                rank_zero_info("QAT: the network and checkpoint hold no QAT state: they are evaluated as float.")
        elif self._paused is None:
            self._paused = ao.pause_observers(network)

    def resume(self, network: nn.Module | None) -> None:
        """Observers as they were before :meth:`pause`."""
        if network is not None and self._paused is not None:
            ao.restore_observers(network, self._paused)
            self._paused = None

    def hold(self) -> None:
        """Before a training step: frozen standalone BatchNorms back in eval mode (``train()`` undid it)."""
        ao.hold_eval(self._held)

    def _freeze_bn(self, network: nn.Module, where: str) -> None:
        all_reduce_batch_norm(network)  # every DDP rank freezes the same statistics (broadcast_buffers=False)
        self._held = freeze_batch_norm(network)
        self.bn_frozen = True
        self.applied["bn"] = where

    def _freeze_observers(self, network: nn.Module, where: str) -> None:
        ao.set_observers(network, False)
        self.observers_frozen = True
        self.applied["observers"] = where
