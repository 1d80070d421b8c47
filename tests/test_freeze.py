import lightning.pytorch as pl
import pytest
import torch
from conftest import BoringClassifier, pretrained_tiny, trainer_kwargs
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch import nn

from lightning_qat import QATCallback
from lightning_qat.quantization import ao


def _fit(tmp_path, digits8, float_tiny, *extra):
    qat = QATCallback(freeze_bn_after=2, freeze_observers_after=3, export=[], latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=5, limit_train_batches=3, callbacks=[qat, *extra]))
    trainer.fit(pretrained_tiny(float_tiny), datamodule=digits8)
    return qat, trainer


def test_the_report_says_where_the_schedule_froze(tmp_path, digits8, float_tiny):
    qat, _ = _fit(tmp_path, digits8, float_tiny)
    assert qat.report.freezing == {"bn": "epoch 2", "observers": "epoch 3"}
    assert "frozen in the fit: BatchNorm statistics at epoch 2; observers at epoch 3" in qat.report.summary()


def test_a_fit_early_stopping_stopped_freezes_before_converting_and_says_so(tmp_path, digits8, float_tiny):
    stop_after_first_validation = EarlyStopping(monitor="val_acc", mode="max", stopping_threshold=0.0)
    with pytest.warns(
        UserWarning, match=r"the fit stopped at epoch \d, before the schedule froze BatchNorm statistics"
    ):
        qat, trainer = _fit(tmp_path, digits8, float_tiny, stop_after_first_validation)
    assert trainer.current_epoch < 2  # the schedule's epochs were never reached
    assert qat.freezing.bn_frozen
    assert qat.freezing.observers_frozen
    assert qat.report.freezing["bn"].startswith("fit end (planned at epoch 2; the fit stopped at epoch ")
    assert qat.report.freezing["observers"].startswith("fit end (planned at epoch 3;")
    network = trainer.lightning_module.net
    assert not any(bool(fq.observer_enabled[0]) for _, fq in ao.fake_quant_modules(network))


def test_a_schedule_beyond_the_run_is_not_forced_at_the_end(tmp_path, digits8, float_tiny):
    qat = QATCallback(freeze_bn_after=1, freeze_observers_after=9, export=[], latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[qat]))
    with pytest.warns(UserWarning, match=r"freeze_observers_after=9 resolves to epoch 9, which a run of 2 epochs"):
        trainer.fit(pretrained_tiny(float_tiny), datamodule=digits8)
    assert qat.report.freezing == {"bn": "epoch 1"}  # warned at the start, and left so
    assert "frozen in the fit: BatchNorm statistics at epoch 1; observers never" in qat.report.summary()


class ReluThenNorm(nn.Module):
    """A BatchNorm after the ReLU: no Conv to fuse into, it stays a standalone (float) BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.bn(self.relu(self.conv(x))).mean((2, 3)))


class TrainsAfterValidation(BoringClassifier):
    """Puts the whole module back in training mode after each validation, as LightningModule's own hook does."""

    def on_validation_model_train(self):
        self.train()


class RunningMeans(Callback):
    def __init__(self):
        self.means = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bn = next(m for m in pl_module.net.modules() if isinstance(m, nn.BatchNorm2d))
        self.means.append((trainer.current_epoch, bn.running_mean.clone()))


def test_a_frozen_standalone_batchnorm_stays_frozen_between_validations_and_nothing_stays_on_it(tmp_path, digits8):
    qat = QATCallback(freeze_bn_after=1, freeze_observers_after=2, export=[], latency_repeats=1)
    means = RunningMeans()
    model = TrainsAfterValidation(ReluThenNorm())
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=3, limit_train_batches=4, val_check_interval=2, callbacks=[qat, means])
    )
    trainer.fit(model, datamodule=digits8)  # validation twice an epoch, train() after each
    frozen = [mean for epoch, mean in means.means if epoch >= 1]
    assert len(frozen) == 8
    assert all(torch.equal(mean, frozen[0]) for mean in frozen)  # no step moved the statistics once frozen
    assert not torch.equal(means.means[0][1], means.means[3][1])  # before: they did
    bn = next(m for m in model.net.modules() if isinstance(m, nn.BatchNorm2d))
    assert not bn._forward_pre_hooks  # noqa: SLF001 - nothing of ours left on the user's module
    model.train()
    assert bn.training
