"""Train float, save a checkpoint, then QAT-fine-tune from it (the same as `--model.init_checkpoint` in the CLI)."""

import lightning.pytorch as pl

from lightning_qat import QATCallback, QATReport
from lightning_qat.app.data import DigitsDataModule
from lightning_qat.app.models import ImageClassifier


def main(float_epochs: int = 5, qat_epochs: int = 4, root: str = "outputs", **trainer_kwargs) -> QATReport:
    pl.seed_everything(0)
    dm = DigitsDataModule(image_size=32, channels=3)
    float_trainer = pl.Trainer(
        max_epochs=float_epochs, default_root_dir=f"{root}/float", logger=False, **trainer_kwargs
    )
    float_trainer.fit(ImageClassifier("resnet18", lr=0.05), datamodule=dm)
    float_trainer.save_checkpoint(f"{root}/float/resnet18.ckpt")

    model = ImageClassifier("resnet18", lr=0.005, init_checkpoint=f"{root}/float/resnet18.ckpt")
    qat = QATCallback(freeze_bn_after=2, freeze_observers_after=3, monitor="val_acc", ptq_baseline=True)
    pl.Trainer(max_epochs=qat_epochs, callbacks=[qat], default_root_dir=f"{root}/qat", **trainer_kwargs).fit(
        model, datamodule=dm
    )
    print(qat.report.to_markdown())
    return qat.report


if __name__ == "__main__":
    main()
