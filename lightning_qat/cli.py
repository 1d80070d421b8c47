"""Config-driven QAT runs: ``lightning-qat fit|validate|test`` on LightningCLI (jsonargparse + OmegaConf)."""

from __future__ import annotations

import copy
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_qat.callbacks.qat import QATCallback
from lightning_qat.data import DigitsDataModule
from lightning_qat.models import ImageClassifier

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


class QATLightningCLI(LightningCLI):
    """LightningCLI with a ``qat`` group (every :class:`QATCallback` argument) and an optional float pre-training.

    ``--pretrain.epochs N`` (with ``--pretrain.lr``) trains the float model for N epochs with a separate trainer
    before the QAT fit starts, the usual recipe (train float, then QAT-fine-tune at a low learning rate) in one
    command. ``--model.init_checkpoint`` starts from float weights you already have instead.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--qat.*`` and ``--pretrain.*``."""
        parser.add_lightning_class_args(QATCallback, "qat")
        parser.add_argument("--pretrain.epochs", type=int, default=0, help="float pre-training epochs before QAT")
        parser.add_argument("--pretrain.lr", type=float, default=0.05, help="learning rate of the float pre-training")

    def instantiate_classes(self) -> None:
        """Turn errors raised by the configured classes (bad backend, missing checkpoint...) into CLI errors."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as err:
            self.parser.error(str(err))

    def before_fit(self) -> None:
        """Float pre-training, when ``--pretrain.epochs`` > 0."""
        pretrain = self.config[self.subcommand].pretrain
        if pretrain.epochs <= 0:
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
        parser_kwargs={
            "parser_mode": "omegaconf+",
            **{
                sub: {"parser_mode": "omegaconf+", "default_config_files": [str(DEFAULT_CONFIG)]}
                for sub in ("fit", "validate", "test", "predict")
            },
        },
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
