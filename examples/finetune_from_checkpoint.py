"""Train float, save a checkpoint, then QAT-fine-tune from it (the same as `--model.init_checkpoint` in the CLI)."""

import lightning.pytorch as pl

from lightning_qat import QATCallback
from lightning_qat.data import DigitsDataModule
from lightning_qat.models import ImageClassifier

if __name__ == "__main__":
    pl.seed_everything(0)
    dm = DigitsDataModule(image_size=32, channels=3)
    float_trainer = pl.Trainer(max_epochs=5, default_root_dir="outputs/float", logger=False)
    float_trainer.fit(ImageClassifier("resnet18", lr=0.05), datamodule=dm)
    float_trainer.save_checkpoint("outputs/float/resnet18.ckpt")

    model = ImageClassifier("resnet18", lr=0.005, init_checkpoint="outputs/float/resnet18.ckpt")
    qat = QATCallback(freeze_bn_after=2, freeze_observers_after=3, monitor="val_acc", ptq_baseline=True)
    pl.Trainer(max_epochs=4, callbacks=[qat], default_root_dir="outputs/qat").fit(model, datamodule=dm)
    print(qat.report.to_markdown())
