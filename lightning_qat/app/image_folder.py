"""Your own images: a LightningDataModule over torchvision's ``ImageFolder`` layout, checked when it is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _ConvertMode:
    """PIL image -> the given mode ("RGB", "L"); a class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Any) -> Any:
        return image.convert(self.mode)


class _Images(Dataset):
    """The images of a flat folder, for ``predict`` (no classes): ``(image,)`` per item."""

    def __init__(self, files: list[Path], transform: Any) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (self.transform(default_loader(str(self.files[index]))),)


class ImageFolderDataModule(pl.LightningDataModule):
    """Images in class folders, as torchvision's ``ImageFolder`` reads them.

    ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` are required, ``root/test/<class>/…`` optional (the
    test stage), and ``root/predict/*.png`` optional (the predict stage, no classes). The class names are the
    ``train`` folder names; ``val`` and ``test`` must have the same ones. The defaults are the preprocessing of
    torchvision's ImageNet weights (resize 256, center crop 224, ImageNet mean/std).

    Args:
        root: the folder holding ``train/``, ``val/`` (and optional ``test/``, ``predict/``).
        image_size: side of the (cropped) square images the network sees.
        resize_size: evaluation images are resized to this (shorter side), then center-cropped to ``image_size``;
            ``None`` resizes to ``image_size`` directly.
        random_crop: training images get ``RandomResizedCrop(image_size)`` (else the evaluation transform).
        horizontal_flip: training images are flipped at random.
        mean: per-channel mean of the normalisation.
        std: per-channel std of the normalisation.
        batch_size: batch size of every loader.
        num_workers: DataLoader workers.
        persistent_workers: keep workers alive between epochs (needs ``num_workers > 0``).

    Raises:
        ValueError: for a missing folder, an empty class folder, a file that is not an image, or class folders that
            differ between splits; each names the path.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        resize_size: int | None = 256,
        random_crop: bool = True,
        horizontal_flip: bool = True,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        batch_size: int = 32,
        num_workers: int = 0,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0.")
        if len(mean) != len(std):
            raise ValueError(f"mean={mean} and std={std} must have one value per channel each.")
        self.save_hyperparameters()
        self.root = Path(root)
        self.classes = self._check_split("train")
        for split in ("val", "test"):
            if split == "val" or (self.root / split).is_dir():
                found = self._check_split(split)
                if found != self.classes:
                    raise ValueError(
                        f"{self.root / split} has the classes {found}, but {self.root / 'train'} has {self.classes}; "
                        "every split needs the same class folders."
                    )
        self.datasets: dict[str, Dataset] = {}

    @property
    def num_classes(self) -> int:
        """The number of class folders in ``train/``."""
        return len(self.classes)

    def _check_split(self, split: str) -> list[str]:
        folder = self.root / split
        if not folder.is_dir():
            raise ValueError(f"No {split} folder at {folder}: the layout is {self.root}/{{train,val}}/<class>/<image>.")
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"{folder} has no class folders: put each class's images in {folder}/<class>/.")
        for name in classes:
            files = [p for p in (folder / name).rglob("*") if p.is_file()]
            if not files:
                raise ValueError(f"The class folder {folder / name} is empty.")
            for file in files:
                if not file.name.lower().endswith(IMG_EXTENSIONS):
                    raise ValueError(
                        f"{file} is not an image (extensions {list(IMG_EXTENSIONS)}): move it out of the class folders."
                    )
        return classes

    def _transform(self, train: bool) -> transforms.Compose:
        hp = AttributeDict(self.hparams)  # read-only view with attribute access, typed
        if train and hp.random_crop:
            steps: list[Any] = [transforms.RandomResizedCrop(hp.image_size)]
        elif hp.resize_size is None:
            steps = [transforms.Resize((hp.image_size, hp.image_size))]
        else:
            steps = [transforms.Resize(hp.resize_size), transforms.CenterCrop(hp.image_size)]
        if train and hp.horizontal_flip:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [
            _ConvertMode("L" if len(hp.mean) == 1 else "RGB"),
            transforms.ToTensor(),
            transforms.Normalize(hp.mean, hp.std),
        ]
        return transforms.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        """Index the image files (once per split)."""
        for split in ("train", "val", "test"):
            if split not in self.datasets and (self.root / split).is_dir():
                self.datasets[split] = ImageFolder(str(self.root / split), transform=self._transform(split == "train"))
        predict = self.root / "predict"
        if "predict" not in self.datasets and predict.is_dir():
            files = sorted(p for p in predict.rglob("*") if p.name.lower().endswith(IMG_EXTENSIONS))
            self.datasets["predict"] = _Images(files, self._transform(train=False))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"No {split} folder at {self.root / split}.")
        hp = AttributeDict(self.hparams)  # read-only view with attribute access, typed
        return DataLoader(
            self.datasets[split],
            batch_size=hp.batch_size,
            shuffle=shuffle,
            num_workers=hp.num_workers,
            persistent_workers=hp.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training images."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation images, in order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test images (``root/test``), in order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The images of ``root/predict``, in file-name order."""
        return self._loader("predict", shuffle=False)
