"""The embedded default data: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes), offline."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import DataLoader, Sampler, TensorDataset


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch).

    A fit resumed at epoch k sees exactly the batches an uninterrupted fit sees; Lightning calls ``set_epoch``
    before every epoch.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self):  # noqa: D105
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:  # noqa: D105
        return self.size


class DigitsDataModule(pl.LightningDataModule):
    """Scikit-learn's digits as a LightningDataModule, resized so torchvision backbones fit.

    The split is stratified and deterministic (``seed``): ``val_fraction`` and ``test_fraction`` of the images for
    validation and test, the rest for training.

    Args:
        image_size: side of the (bilinearly resized) square images; 8 keeps the originals.
        channels: 1 (grey) or 3 (the grey image repeated, for ImageNet-style backbones).
        batch_size: batch size of every loader.
        num_workers: DataLoader workers.
        val_fraction: share of images for validation.
        test_fraction: share of images for test.
        seed: seed of the split.
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image_size={image_size} must be >= 8 (the digits are 8x8).")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} is invalid; valid values are [1, 3].")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) with a sum < 1."
            )
        # explicit, so a subclass with other __init__ arguments keeps these (Lightning reads the outermost frame)
        self.save_hyperparameters(
            {
                "image_size": image_size,
                "channels": channels,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "seed": seed,
            }
        )
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load, normalise, resize and split the images (once)."""
        if self.splits:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        hp = AttributeDict(self.hparams)  # read-only view with attribute access, typed
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = (images - 0.3) / 0.4
        if hp.image_size != 8:
            images = F.interpolate(images, size=hp.image_size, mode="bilinear", align_corners=False)
        images = images.repeat(1, hp.channels, 1, 1).contiguous()
        labels = torch.tensor(digits.target, dtype=torch.long)
        index = list(range(len(labels)))
        holdout = hp.val_fraction + hp.test_fraction
        train_idx, rest = train_test_split(index, test_size=holdout, random_state=hp.seed, stratify=labels)
        if hp.test_fraction > 0:
            val_idx, test_idx = train_test_split(
                rest, test_size=hp.test_fraction / holdout, random_state=hp.seed, stratify=labels[rest]
            )
        else:
            val_idx, test_idx = rest, rest
        for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
            self.splits[name] = TensorDataset(images[idx], labels[idx])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.splits[split]
        sampler = EpochShuffleSampler(len(dataset), self.hparams["seed"]) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.hparams["batch_size"],
            sampler=sampler,
            num_workers=self.hparams["num_workers"],
            persistent_workers=self.hparams["num_workers"] > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training images."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation images, in order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test images, in order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test images without their labels, in order."""
        images = self.splits["test"].tensors[0]
        return DataLoader(TensorDataset(images), batch_size=self.hparams["batch_size"])
