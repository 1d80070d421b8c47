"""Evaluating float / PTQ / QAT / int8 networks with the user's own ``validation_step`` / ``test_step`` on the CPU."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from torch import nn
from torchmetrics import Metric

from lightning_qat.lightning import internals
from lightning_qat.quantization import ao, compat

Stage = Literal["val", "test"]


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keep a helper trainer's start-up lines (GPU available, Lightning's tips, ...) out of the user's log."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def module_with_network(pl_module: pl.LightningModule, target: str, network: nn.Module) -> pl.LightningModule:
    """A CPU copy of ``pl_module`` whose submodule ``target`` is ``network``; ``pl_module`` is not changed.

    The original network is swapped out while copying so it is neither copied nor moved.
    """
    original = pl_module.get_submodule(target)
    compat.set_submodule(pl_module, target, nn.Identity())
    try:
        clone = copy.deepcopy(pl_module)
    finally:
        compat.set_submodule(pl_module, target, original)
    compat.set_submodule(clone, target, network)
    internals.forget_metric_attributes(clone)  # `self.log(metric)` looks metrics up by id
    # Only global rank 0 evaluates: a torchmetrics sync would wait forever for the other ranks.
    for metric in clone.modules():
        if isinstance(metric, Metric):
            metric.distributed_available_fn = _single_process
    return clone.cpu()


def _single_process() -> bool:
    return False


@dataclass
class EvalData:
    """Where the final evaluation's batches come from, and how many: what :func:`run_evaluation` reads.

    ``datamodule`` (its ``val_dataloader`` / ``test_dataloader``), else ``dataloaders``, else the LightningModule's own
    hooks. ``limit``: batches (or a fraction), as ``Trainer(limit_val_batches=...)``; ``None`` for all.
    ``calibration``: builds the training batches a post-training-quantized baseline calibrates on.
    """

    datamodule: pl.LightningDataModule | None = None
    dataloaders: Any = None
    limit: int | float | None = None
    calibration: Callable[[], Iterable[Any]] | None = None


def eval_data(trainer: pl.Trainer, stage: Stage | None) -> EvalData:
    """The :class:`EvalData` of a running fit: its datamodule or the dataloaders given to ``fit``, its limit.

    Re-created from their source, so a distributed sampler never hides part of the data.
    """
    datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector
    loaders = None
    if datamodule is None and stage is not None:
        source = internals.eval_data_source(trainer, stage)
        if source is not None and not isinstance(source, pl.LightningModule):
            loaders = source
    limit = trainer.limit_val_batches if stage != "test" else trainer.limit_test_batches

    def calibration() -> Iterable[Any]:
        if trainer.train_dataloader is not None:
            return trainer.train_dataloader
        if datamodule is not None:
            return datamodule.train_dataloader()
        fitting = trainer.state.fn == "fit"  # before the fit loop builds its loader (the search at fit start)
        loaders = internals.fit_train_dataloader(trainer) if fitting else None
        return loaders if loaders is not None else ()

    return EvalData(datamodule, loaders, limit, calibration)


def run_evaluation(
    pl_module: pl.LightningModule,
    stage: Stage,
    backend: str,
    data: EvalData,
    progress: ProgressBar | None = None,
    limit: int | float | None = None,
    root_dir: str = ".",
    label: str = "",
) -> dict[str, float]:
    """Run the user's ``validation_step``/``test_step`` on ``pl_module`` on the CPU with Lightning's own loop.

    Batches come from ``data``; ``limit`` overrides ``data.limit``. ``progress``: the fit's progress bar, whose kind
    (rich or tqdm) this evaluation's bar takes, named ``label`` and gone when done (none for other bars, or None).
    Returns the logged metrics as floats.
    """
    datamodule = data.datamodule
    kwargs: dict[str, Any] = {}
    if datamodule is not None:
        kwargs["datamodule"] = datamodule
    elif data.dataloaders is not None:
        kwargs["dataloaders"] = data.dataloaders
    limit = limit if limit is not None else data.limit
    limit = 1.0 if limit is None else limit
    previous_dm_trainer = datamodule.trainer if datamodule is not None else None
    bar = _bar_like(progress, label or stage)
    with quiet_lightning():
        eval_trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=bar is not None,
            callbacks=[bar] if bar is not None else None,
            limit_val_batches=limit,
            limit_test_batches=limit,
            default_root_dir=root_dir,
        )
        try:
            with ao.engine(backend), ao.quiet():
                run = eval_trainer.validate if stage == "val" else eval_trainer.test
                results = run(pl_module, verbose=False, **kwargs)
        finally:
            if datamodule is not None:
                datamodule.trainer = previous_dm_trainer
    metrics: dict[str, float] = {}
    for result in results:
        for name, value in result.items():
            metrics[name.split("/dataloader_idx_")[0] if len(results) == 1 else name] = float(value)
    return metrics


def stop_display(progress: ProgressBar | None) -> None:
    """End the fit's rich live display now, leaving its last state on the terminal once.

    Lightning stops it in ``teardown``, after ``on_fit_end``: everything the end of fit prints would redraw the
    epoch's bar below it, and the bar would be drawn once more after the report. A tqdm bar is closed already.
    """
    live = getattr(progress, "progress", None) if isinstance(progress, RichProgressBar) else None
    if live is not None:
        live.stop()  # rich's Progress; Lightning's own stop in teardown is then a no-op


class _Named:
    """A progress bar for one end-of-fit evaluation, named by what it evaluates (``label``), gone when it ends."""

    label: str

    @property
    def validation_description(self) -> str:  # noqa: D102
        return self.label

    @property
    def test_description(self) -> str:  # noqa: D102
        return self.label


class _RichBar(_Named, RichProgressBar):
    def __init__(self, label: str) -> None:
        super().__init__(leave=False)
        self.label = label


class _TqdmBar(_Named, TQDMProgressBar):
    def __init__(self, label: str) -> None:
        super().__init__(leave=False)
        self.label = label


def _bar_like(progress: ProgressBar | None, label: str) -> ProgressBar | None:
    """A bar of the kind of ``progress`` for one evaluation (one display at a time: the fit's is stopped first)."""
    if isinstance(progress, RichProgressBar):
        return _RichBar(label)
    if isinstance(progress, TQDMProgressBar):
        return _TqdmBar(label)
    return None


@contextlib.contextmanager
def showing(progress: ProgressBar | None, label: str) -> Iterator[None]:
    """Name a step of the end of fit while it runs: a rich status line (gone when done) where the fit used rich.

    The steps between evaluations (converting, compiling the artifact, timing) have no batches to count; with a tqdm
    bar or none, nothing is shown (their results are in the log and the report).
    """
    if not isinstance(progress, RichProgressBar):
        yield
        return
    from rich.console import Console

    with Console().status(label):
        yield
