"""Structural outliers: the accuracy-budget search against a channel int8 cannot carry, beside ``skip=`` by hand.

One small CNN (conv-bn-relu x3, pooling, a Linear) trains in float on digits at 8x8 (8 epochs), then is rewritten
into networks computing the same function with one channel into conv2 300x larger than the rest: by a fixed gain
(a buffer multiplied in), by a branch concatenated in (the channel computed apart, scaled), or by BatchNorm1's scale
(a layer's own output). Each then runs QAT as a user would (3 epochs, Adam at 1e-4, BatchNorm frozen after 1,
observers after 2, ``monitor="val_acc"``, a 1-point budget, static activations): without a fallback, with
``on_drop="fallback"`` (its defaults), and with ``skip=`` of the culprit by hand where a module is one. "start": the
int8 model of a copy calibrated on 8 training batches before any training (what the search at the fit's start sees);
"QAT trains back": plain QAT's int8 accuracy over that start's, the evidence for the threshold
(``budget.RECOVERS``) past which the search runs at the start. "fallback int8" also gives the QAT network's own
accuracy at the end: what fine-tuning left of the float accuracy, which no set kept float can beat.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_qat import QATCallback
from lightning_qat.app.data import DigitsDataModule
from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.prepare import prepare_model

FACTOR = 300.0
KINDS = ("none", "gain", "concat", "scale")
LR = 1e-4  # QAT fine-tuning (Adam); at 1e-3, 3 epochs cost the float weights 1-4 points on their own
HAND = {"gain": ["gain"], "concat": ["side"], "scale": ["conv1"]}  # skip= of the culprit's module


class Gain(nn.Module):
    """A fixed per-channel gain (a buffer): a module, so ``skip=["gain"]`` can name it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("value", torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value


class Net(nn.Module):
    """Conv-BN-ReLU x3, pooling, a Linear; ``kind`` sets where channel 0 into conv2 is made large (see the module)."""

    def __init__(self, kind: str = "none") -> None:
        super().__init__()
        self.kind = kind
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.side = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.BatchNorm2d(1), nn.ReLU())
        self.gain = Gain(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        if self.kind == "gain":
            h = self.gain(h)
        elif self.kind == "concat":
            h = torch.cat([h[:, 1:], self.side(x)], 1)
        h = torch.relu(self.bn2(self.conv2(h)))
        h = torch.relu(self.bn3(self.conv3(h)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def rewritten(trained: Net, kind: str) -> Net:
    """``trained``'s function with channel 0 into conv2 :data:`FACTOR` x larger, made the ``kind`` way."""
    net = copy.deepcopy(trained)
    net.kind = kind
    with torch.no_grad():
        if kind == "gain":
            net.gain.value[:, 0] = FACTOR
        elif kind == "scale":
            net.bn1.weight[0] *= FACTOR
            net.bn1.bias[0] *= FACTOR
        elif kind == "concat":  # channel 0 computed by the side branch, moved last
            net.side[0].weight.copy_(net.conv1.weight[:1])
            net.side[0].bias.copy_(net.conv1.bias[:1])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(net.side[1], name).copy_(getattr(net.bn1, name)[:1])
            net.side[1].weight *= FACTOR
            net.side[1].bias *= FACTOR
            net.conv2.weight.copy_(torch.cat([net.conv2.weight[:, 1:], net.conv2.weight[:, :1]], 1))
        if kind != "none":
            last = -1 if kind == "concat" else 0
            net.conv2.weight[:, last] /= FACTOR
    return net


class Classifier(pl.LightningModule):
    def __init__(self, net: Net, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        self.val_acc = MulticlassAccuracy(10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _trainer(workdir: Path, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=workdir,
        callbacks=callbacks,
    )  # fmt: skip


def start_accuracy(net: Net, engine: str, data: DigitsDataModule) -> float:
    """The int8 accuracy of a copy of ``net`` prepared by ``engine`` and calibrated on 8 training batches."""
    images = data.splits["train"].tensors[0]
    prepared = prepare_model(copy.deepcopy(net), "x86", engine, [], (images[:64],)).module.eval()
    with torch.no_grad(), ao.quiet():
        for i in range(8):
            prepared(images[i * 64 : (i + 1) * 64])
    int8 = to_int8(prepared, engine, "x86", (images[:8],))
    x, y = data.splits["val"].tensors
    with torch.no_grad(), ao.quiet():
        return float((int8(x).argmax(1) == y).float().mean())


def qat(net: Net, engine: str, data: DigitsDataModule, workdir: Path, epochs: int, **kwargs: object) -> QATCallback:
    """QAT of a copy of ``net`` as the module says; the callback (its report) after the fit."""
    callback = QATCallback(
        monitor="val_acc", max_metric_drop=0.01, engine=engine, activations="static", freeze_bn_after=1,  # type: ignore[arg-type]
        freeze_observers_after=2, save_dir=str(workdir), overwrite=True, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    _trainer(workdir, epochs, [callback]).fit(Classifier(copy.deepcopy(net), lr=LR), datamodule=data)
    return callback


def rows(workdir: Path, quick: bool) -> list[str]:
    """The table's lines, one per network and engine."""
    data = DigitsDataModule(image_size=8, channels=1, batch_size=64)
    data.setup("fit")
    pl.seed_everything(0)
    trained = Classifier(Net(), lr=1e-2)
    _trainer(workdir / "float", 2 if quick else 8, []).fit(trained, datamodule=data)
    engines = ["fx"] if quick else ["fx", "pt2e"]
    lines = [HEADER]
    for kind in ("gain",) if quick else KINDS:
        net = rewritten(trained.net, kind)
        for engine in engines:
            here = workdir / f"{kind}-{engine}"
            epochs = 1 if quick else 3
            plain = qat(net, engine, data, here / "plain", epochs, on_drop="warn").report
            found = qat(net, engine, data, here / "fallback", epochs, on_drop="fallback").report
            assert plain is not None
            assert found is not None
            start = start_accuracy(net, engine, data)
            float_acc, plain_acc = plain.metrics["float"]["val_acc"], plain.metrics["int8"]["val_acc"]
            hand = "-"
            if kind in HAND:
                try:
                    by_hand = qat(net, engine, data, here / "hand", epochs, on_drop="warn", skip=HAND[kind]).report
                except RuntimeError as err:  # refused in setup (torchao cannot prepare some skipped branches)
                    hand = f"refused in setup: {str(err).split(':')[0]} ({', '.join(HAND[kind])})"
                else:
                    assert by_hand is not None
                    hand = f"{by_hand.metrics['int8']['val_acc']:.3f} ({', '.join(HAND[kind])})"
            whens = list(dict.fromkeys(c["when"] for c in found.fallback_candidates)) or ["-"]
            met = {True: "met", False: "missed", None: "no search"}[found.fallback_met]
            cells = [
                kind, engine, f"{float_acc:.3f}", f"{start:.3f}", f"{plain_acc:.3f}", f"{plain_acc - start:+.3f}",
                f"{found.metrics['int8']['val_acc']:.3f} ({met}; QAT {found.metrics['qat']['val_acc']:.3f})",
                ", ".join(found.fallback) or "-",
                str(found.fallback_evaluations), f"{found.fallback_seconds:.1f}", ", ".join(whens), hand,
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines


HEADER = (
    "| outlier | engine | float acc | int8 at start | plain QAT int8 | QAT trains back | fallback int8 | kept float | "
    "evaluations | search s | searched at | skip= by hand: int8 |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)
