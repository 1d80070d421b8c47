"""QAT on your own LightningModule, no configs: one callback in the Trainer."""

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_qat import QATCallback, load_quantized
from lightning_qat.app.data import DigitsDataModule


class SmallCNN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main(float_epochs: int = 8, qat_epochs: int = 4, save_dir: str = "outputs/custom", **trainer_kwargs) -> float:
    pl.seed_everything(0)
    dm = DigitsDataModule(image_size=8, channels=1)
    model = SmallCNN()
    quiet = {"logger": False, "enable_checkpointing": False, **trainer_kwargs}
    pl.Trainer(max_epochs=float_epochs, **quiet).fit(model, datamodule=dm)  # float first
    qat = QATCallback(freeze_bn_after=2, freeze_observers_after=3, monitor="val_acc", save_dir=save_dir)
    pl.Trainer(max_epochs=qat_epochs, callbacks=[qat], **quiet).fit(model, datamodule=dm)
    int8 = load_quantized(qat.artifact_path)  # TorchScript, runs without this file's code
    x, y = dm.splits["val"].tensors
    accuracy = (int8(x).argmax(1) == y).float().mean().item()
    print("reloaded int8 accuracy:", accuracy)
    return accuracy


if __name__ == "__main__":
    main()
