"""The embedded default model: any torchvision classification architecture as a LightningModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy

from lightning_qat.lightning.checkpoint import read_checkpoint


def load_float_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a float state dict from a Lightning ``.ckpt`` or a plain ``torch.save(state_dict)`` file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file is not a readable checkpoint, or holds Python objects that only a full unpickling
            (which can run code) would load.
        ValueError: if it holds no state dict.
    """
    data = read_checkpoint(path)
    state = data.get("state_dict", data)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} holds no state dict (a Lightning .ckpt or torch.save(model.state_dict())).")
    return state


def pretrained_state_dict(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision's ``weights`` (``"IMAGENET1K_V1"``, ``"DEFAULT"``...) for ``arch``, offline.

    Read from the torch hub cache (``$TORCH_HOME/hub/checkpoints``, where torchvision keeps downloads); nothing is
    downloaded.

    Raises:
        ValueError: if ``weights`` is not one of ``arch``'s weight names.
        FileNotFoundError: if the file is not in the cache, naming the file, its URL and where to put it.
    """
    enum = torchvision.models.get_model_weights(arch)
    names = [w.name for w in enum]
    try:
        entry = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        raise ValueError(
            f"weights={weights!r} is not a weight of {arch}; choose one of {['DEFAULT', *names]}."
        ) from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    if not path.is_file():
        raise FileNotFoundError(
            f"weights={weights!r} ({arch} {entry.name}) needs {path.name}, which is not in the torch hub cache: "
            f"download {entry.url} and put it at {path} (no download is attempted)."
        )
    return load_float_weights(path)


def load_backbone(network: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` into ``network``, except entries of another shape (a head for another class count).

    Those keep their fresh initialisation; their names are returned.

    Raises:
        ValueError: if ``state`` does not fit ``network`` beyond differently shaped entries (another architecture).
    """
    own = network.state_dict()
    replaced = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    kept = {k: v for k, v in state.items() if k not in replaced}
    result = network.load_state_dict(kept, strict=False)
    missing = [k for k in result.missing_keys if k not in replaced]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the weights do not fit {type(network).__name__}: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]} (first 5 of each); is it another architecture?"
        )
    return replaced


class ImageClassifier(pl.LightningModule):
    """A torchvision classification architecture (``weights=None``) with cross-entropy and accuracy metrics.

    Args:
        arch: a name of ``torchvision.models.list_models(torchvision.models)``, e.g. ``"resnet18"``.
        num_classes: output classes.
        lr: learning rate of SGD with momentum 0.9 and a cosine schedule over the fit.
        weight_decay: SGD weight decay.
        arch_kwargs: extra keyword arguments of the architecture (``{"width_mult": 0.5}`` for mobilenet_v2).
        weights: torchvision's pretrained weights for ``arch`` (``"DEFAULT"``, ``"IMAGENET1K_V1"``...), read offline
            from the torch hub cache; a head for another ``num_classes`` is re-initialised.
        init_checkpoint: float weights to start from: a Lightning ``.ckpt`` of this class or a ``state_dict`` file
            of the network (``model.`` prefixes are handled), the fine-tuning starting point; a head for another
            class count is re-initialised (the message names the replaced keys).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        arch_kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        available = torchvision.models.list_models(torchvision.models)
        if arch not in available:
            raise ValueError(f"arch={arch!r} is not a torchvision classification model; choose one of {available}.")
        if "weights" in (arch_kwargs or {}):
            raise ValueError(
                f"arch_kwargs={arch_kwargs!r}: give pretrained weights as weights=..., not in arch_kwargs."
            )
        self.save_hyperparameters()
        self.model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **(arch_kwargs or {}))
        if weights is not None:
            self._load_float(pretrained_state_dict(arch, weights), f"weights={weights!r}")
        self.criterion = torch.nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        if init_checkpoint is not None:
            state = load_float_weights(init_checkpoint)
            network_state = {k.removeprefix("model."): v for k, v in state.items() if not k.endswith("_acc")}
            self._load_float(network_state, f"init_checkpoint={init_checkpoint!r}")

    def _load_float(self, state: dict[str, torch.Tensor], source: str) -> None:
        try:
            replaced = load_backbone(self.model, state)
        except ValueError as err:
            raise ValueError(f"{source} does not fit arch={self.hparams['arch']!r}: {err}") from err
        if replaced:
            rank_zero_info(
                f"{source}: loaded; {replaced} had another shape (a head for another class count) and were "
                f"re-initialised for num_classes={self.hparams['num_classes']}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy step; logs ``train_loss`` and ``train_acc``."""
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_acc``."""
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Logs ``test_loss`` and ``test_acc``."""
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities of the images of ``batch`` (a tensor, or a list/tuple whose first item is one)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=1)

    def configure_optimizers(self) -> Any:
        """SGD with momentum, cosine-annealed over the trainer's estimated steps."""
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.hparams["lr"], momentum=0.9, weight_decay=self.hparams["weight_decay"]
        )
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
