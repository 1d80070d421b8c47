"""Config-driven QAT runs: ``lightning-qat fit|validate|test|convert|analyze`` on LightningCLI and OmegaConf."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_qat import exceptions
from lightning_qat.exceptions import CheckpointError
from lightning_qat.lightning.callback import QATCallback
from lightning_qat.lightning.checkpoint import check_readable
from lightning_qat.lightning.convert_checkpoint import analyze_checkpoint, convert_checkpoint
from lightning_qat.lightning.evaluate import quiet_lightning

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


class QATTrainer(Trainer):
    """The CLI's Trainer: Lightning's, plus the ``convert`` subcommand."""

    def convert(
        self,
        model: pl.LightningModule,
        ckpt_path: str,
        datamodule: pl.LightningDataModule | None = None,
    ) -> None:
        """Convert a QAT checkpoint to int8 without training: artifact and report as at the end of fit.

        Args:
            model: a fresh instance of the checkpoint's LightningModule.
            ckpt_path: the QAT checkpoint (e.g. the best one of a fit).
            datamodule: the data of the final evaluation.
        """
        convert_checkpoint(model, ckpt_path, datamodule=datamodule, trainer=self)

    def analyze(
        self,
        model: pl.LightningModule,
        ckpt_path: str,
        datamodule: pl.LightningDataModule | None = None,
    ) -> None:
        """The report of a QAT checkpoint without its artifact: metrics, per-layer SQNR and ``qat_layers.png``.

        With ``--qat.on_drop=fallback --qat.monitor=... --qat.max_metric_drop=...`` a missed budget is searched: the
        report lists the candidates and the layers to keep float.

        Args:
            model: a fresh instance of the checkpoint's LightningModule.
            ckpt_path: the QAT checkpoint.
            datamodule: the data of the evaluation.
        """
        analyze_checkpoint(model, ckpt_path, datamodule=datamodule, trainer=self)


class QATLightningCLI(LightningCLI):
    """LightningCLI with a ``qat`` group (every :class:`QATCallback` argument) and an optional float pre-training.

    Any LightningModule and LightningDataModule by ``class_path`` (the default config names the embedded
    ``ImageClassifier`` and ``DigitsDataModule``). ``--pretrain.epochs N`` trains the float model for N epochs with a
    separate trainer before the QAT fit starts, the usual recipe (train float, then QAT-fine-tune at a low learning
    rate) in one command; it needs only the module's own ``configure_optimizers``, and ``--pretrain.lr`` sets the
    module's ``lr`` hyperparameter for that stage when it has one; ``--trainer.limit_train_batches`` and
    ``--trainer.limit_val_batches`` apply to it too. ``--model.init_checkpoint`` or ``--model.weights`` start from
    float weights you already have instead.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands, ``convert`` and ``analyze``."""
        return {**LightningCLI.subcommands(), "convert": {"model", "datamodule"}, "analyze": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--qat.*`` and ``--pretrain.*``."""
        parser.add_lightning_class_args(QATCallback, "qat")
        parser.add_argument("--pretrain.epochs", type=int, default=0, help="float pre-training epochs before QAT")
        parser.add_argument(
            "--pretrain.lr",
            type=float | None,
            default=None,
            help="learning rate of the float pre-training (the model's `lr` hyperparameter; None: the model's own)",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse; an error of the config layer (e.g. an interpolation to a missing key) becomes a usage error.

        Then check ``--ckpt_path``, before Lightning reads its hyperparameters.
        """
        try:
            super().parse_arguments(parser, args)
        except Exception as err:  # noqa: BLE001 - reported to the user as a usage error, nothing ran yet
            parser.error(f"the configuration could not be parsed: {type(err).__name__}: {' '.join(str(err).split())}")
        self._check_ckpt_path(parser)

    def instantiate_classes(self) -> None:
        """Turn any error raised while building the configured classes into a one-line usage error (exit 2).

        A bad backend, a missing or unsafe checkpoint, a wrong keyword, a size mismatch: all before any training.
        """
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - reported to the user as a usage error, nothing ran yet
            message = " ".join(str(err).split())
            self.parser.error(f"the configuration could not be instantiated: {type(err).__name__}: {message}")

    def _check_ckpt_path(self, parser: LightningArgumentParser) -> None:
        """A ``--ckpt_path`` that is not a (readable) checkpoint file stops the run before any work, naming the path."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("best", "last", "hpc", "registry"):
            return
        if not Path(ckpt_path).is_file():
            parser.error(f"--ckpt_path={ckpt_path}: no such checkpoint file.")
        try:
            check_readable(ckpt_path)
        except CheckpointError as err:
            parser.error(f"--ckpt_path={ckpt_path}: {err}")

    def _check_class_count(self) -> None:
        """A data module with ``num_classes`` (e.g. image folders) and a model with another ``num_classes`` disagree."""
        data_classes = getattr(self.datamodule, "num_classes", None)
        model_classes = getattr(self.model.hparams, "num_classes", None)
        if isinstance(data_classes, int) and isinstance(model_classes, int) and data_classes != model_classes:
            self.parser.error(
                f"the data has {data_classes} classes but --model.num_classes={model_classes}: set "
                f"--model.num_classes={data_classes}."
            )

    def _before_run(self) -> None:
        self._check_class_count()

    before_validate = before_test = before_predict = before_convert = before_analyze = _before_run

    def before_fit(self) -> None:
        """Float pre-training, when ``--pretrain.epochs`` > 0 and the fit is not a resume."""
        self._before_run()
        config = self.config[self.subcommand]
        pretrain = config.pretrain
        if config.get("ckpt_path"):
            if pretrain.epochs > 0:
                rank_zero_info("Resuming from --ckpt_path: the float pre-training (--pretrain.epochs) is skipped.")
            return
        hparams = self.model.hparams
        if pretrain.epochs <= 0:
            if hparams.get("init_checkpoint", "given") is None and hparams.get("weights", "given") is None:
                callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's init
                qat = next(cb for cb in callbacks if isinstance(cb, QATCallback))
                qat.untrained_float = True  # QAT starts from random weights: no float baseline to guard against
            return
        qat_lr = hparams.get("lr")
        if pretrain.lr is not None and qat_lr is None:
            rank_zero_info(
                f"--pretrain.lr={pretrain.lr} is not applied: {type(self.model).__name__} has no `lr` hyperparameter, "
                "so its own configure_optimizers sets the pre-training learning rate."
            )
        lr = pretrain.lr if pretrain.lr is not None and qat_lr is not None else qat_lr
        rank_zero_info(f"Float pre-training: {pretrain.epochs} epochs at lr {lr} before QAT.")
        if qat_lr is not None:
            hparams.lr = lr
        with quiet_lightning():  # its start-up lines (and Lightning's tips) were said by the QAT trainer's
            trainer = Trainer(
                max_epochs=pretrain.epochs,
                accelerator=self.trainer.accelerator,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=self.trainer.progress_bar_callback is not None,
                default_root_dir=self.trainer.default_root_dir,
                limit_train_batches=self.trainer.limit_train_batches,  # --trainer.limit_*: the whole job, not QAT only
                limit_val_batches=self.trainer.limit_val_batches,
            )
        trainer.fit(self.model, datamodule=copy.copy(self.datamodule))
        if qat_lr is not None:
            hparams.lr = qat_lr
        self.model.trainer = None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-qat`` console script.

    An error lightning-qat raises on purpose (:mod:`lightning_qat.exceptions`), before or after start-up, is one
    ``error:`` line on stderr and exit code 2, as configuration errors are; anything else keeps its traceback.
    """
    try:
        _cli(args)
    except _OUR_ERRORS as err:
        print(f"error: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    # A DDP run (--trainer.strategy=ddp) ends its process group, as torch asks of every DDP process: Lightning keeps it
    # alive, and gloo's threads can abort the exit otherwise. After success only: a failed rank must not wait here.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_OUR_ERRORS = tuple(getattr(exceptions, name) for name in exceptions.__all__)


def _cli(args: list[str] | None) -> None:
    QATLightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=QATTrainer,
        parser_kwargs={
            "parser_mode": "omegaconf+",
            **{
                sub: {"parser_mode": "omegaconf+", "default_config_files": [str(DEFAULT_CONFIG)]}
                for sub in ("fit", "validate", "test", "predict", "convert", "analyze")
            },
        },
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
