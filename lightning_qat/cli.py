"""Config-driven QAT runs: ``lightning-qat fit|validate|test`` on LightningCLI (jsonargparse + OmegaConf)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_qat.callbacks.qat import QATCallback
from lightning_qat.checkpoint import convert_checkpoint
from lightning_qat.data import DigitsDataModule
from lightning_qat.models import ImageClassifier

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


class QATLightningCLI(LightningCLI):
    """LightningCLI with a ``qat`` group (every :class:`QATCallback` argument) and an optional float pre-training.

    ``--pretrain.epochs N`` (with ``--pretrain.lr``) trains the float model for N epochs with a separate trainer
    before the QAT fit starts, the usual recipe (train float, then QAT-fine-tune at a low learning rate) in one
    command. ``--model.init_checkpoint`` starts from float weights you already have instead.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands and ``convert``."""
        return {**LightningCLI.subcommands(), "convert": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--qat.*`` and ``--pretrain.*``."""
        parser.add_lightning_class_args(QATCallback, "qat")
        parser.add_argument("--pretrain.epochs", type=int, default=0, help="float pre-training epochs before QAT")
        parser.add_argument("--pretrain.lr", type=float, default=0.05, help="learning rate of the float pre-training")

    def parse_arguments(self, parser: LightningArgumentParser, args: object) -> None:
        """Parse; an error of the config layer (e.g. an interpolation to a missing key) becomes a usage error."""
        try:
            super().parse_arguments(parser, args)
        except Exception as err:  # noqa: BLE001 - reported to the user as a usage error, nothing ran yet
            parser.error(f"the configuration could not be parsed: {type(err).__name__}: {' '.join(str(err).split())}")

    def instantiate_classes(self) -> None:
        """Turn any error raised while building the configured classes into a one-line usage error (exit 2).

        A bad backend, a missing or unsafe checkpoint, a wrong keyword, a size mismatch: all before any training.
        """
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - reported to the user as a usage error, nothing ran yet
            message = " ".join(str(err).split())
            self.parser.error(f"the configuration could not be instantiated: {type(err).__name__}: {message}")

    def _check_ckpt_path(self) -> None:
        """A ``--ckpt_path`` that is not a file stops the run before any work, naming the path."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in ("best", "last", "hpc", "registry") and not Path(ckpt_path).is_file():
            self.parser.error(f"--ckpt_path={ckpt_path}: no such checkpoint file.")

    before_validate = before_test = before_predict = before_convert = _check_ckpt_path

    def before_fit(self) -> None:
        """Float pre-training, when ``--pretrain.epochs`` > 0 and the fit is not a resume."""
        self._check_ckpt_path()
        config = self.config[self.subcommand]
        pretrain = config.pretrain
        if config.get("ckpt_path"):
            if pretrain.epochs > 0:
                rank_zero_info("Resuming from --ckpt_path: the float pre-training (--pretrain.epochs) is skipped.")
            return
        if pretrain.epochs <= 0:
            if getattr(self.model.hparams, "init_checkpoint", "given") is None:
                qat = next(cb for cb in self.trainer.callbacks if isinstance(cb, QATCallback))
                qat.untrained_float = True  # QAT starts from random weights: no float baseline to guard against
            return
        rank_zero_info(f"Float pre-training: {pretrain.epochs} epochs at lr {pretrain.lr} before QAT.")
        qat_lr = self.model.hparams.lr
        self.model.hparams.lr = pretrain.lr
        trainer = Trainer(
            max_epochs=pretrain.epochs,
            accelerator=self.trainer.accelerator,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=self.trainer.progress_bar_callback is not None,
            default_root_dir=self.trainer.default_root_dir,
        )
        trainer.fit(self.model, datamodule=copy.copy(self.datamodule))
        self.model.hparams.lr = qat_lr
        self.model.trainer = None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-qat`` console script."""
    QATLightningCLI(
        ImageClassifier,
        DigitsDataModule,
        trainer_class=QATTrainer,
        parser_kwargs={
            "parser_mode": "omegaconf+",
            **{
                sub: {"parser_mode": "omegaconf+", "default_config_files": [str(DEFAULT_CONFIG)]}
                for sub in ("fit", "validate", "test", "predict", "convert")
            },
        },
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
