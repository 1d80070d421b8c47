"""Each private Lightning attribute lightning-qat reads, checked on the installed Lightning: a rename fails here."""

import copy
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
from conftest import BoringClassifier, trainer_kwargs
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_qat import QATCallback
from lightning_qat.exceptions import LightningInternalsError
from lightning_qat.lightning import internals as lightning_internals


class Probe(Callback):
    """Reads the seam from inside a real fit."""

    def setup(self, trainer, pl_module, stage):
        self.train_loader = lightning_internals.fit_train_dataloader(trainer)
        self.val_source = lightning_internals.eval_data_source(trainer, "val")

    def on_fit_start(self, trainer, pl_module):
        self.checkpoint = lightning_internals.loaded_checkpoint(trainer)


def _fit(tmp_path, model, callbacks, ckpt_path=None, **data):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=callbacks))
    trainer.fit(model, ckpt_path=ckpt_path, **data)
    return trainer


def test_dataloaders_given_to_fit_are_found_before_lightning_builds_them(tmp_path, digits8):
    train, val = digits8.train_dataloader(), digits8.val_dataloader()
    probe = Probe()
    _fit(tmp_path, BoringClassifier(), [probe], train_dataloaders=train, val_dataloaders=val)
    assert probe.train_loader is train
    assert probe.val_source is val


def test_datamodule_is_the_source_of_its_loaders(tmp_path, digits8):
    probe = Probe()
    _fit(tmp_path, BoringClassifier(), [probe], datamodule=digits8)
    assert isinstance(probe.train_loader, DataLoader)
    assert probe.val_source is digits8


def test_the_checkpoint_being_restored_is_readable_before_the_weights_load(tmp_path, digits8):
    model = BoringClassifier()
    trainer = _fit(tmp_path, model, [Probe()], datamodule=digits8)
    assert trainer.callbacks[0].checkpoint == {}  # no restore
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    probe = Probe()
    _fit(tmp_path, BoringClassifier(), [probe], ckpt_path=tmp_path / "a.ckpt", datamodule=digits8)
    assert probe.checkpoint["global_step"] == 2
    assert "state_dict" in probe.checkpoint


class CopyAtFitEnd(Callback):
    """Deep-copies the LightningModule at fit end, as the final evaluation does, while Lightning's cache is filled."""

    def __init__(self, forget: bool):
        self.forget = forget

    def on_fit_end(self, trainer, pl_module):
        assert pl_module._metric_attributes  # filled by self.log(name, metric) in validation_step
        self.clone = copy.deepcopy(pl_module)
        if self.forget:
            lightning_internals.forget_metric_attributes(self.clone)


@pytest.mark.parametrize("forget", [True, False])
def test_metric_attribute_cache_of_a_copy_is_forgotten(tmp_path, digits8, forget):
    copier = CopyAtFitEnd(forget)
    _fit(tmp_path, BoringClassifier(), [copier], datamodule=digits8)
    validate = pl.Trainer(**trainer_kwargs(tmp_path)).validate
    if forget:
        assert 0 < validate(copier.clone, datamodule=digits8, verbose=False)[0]["val_acc"] <= 1
    else:  # the stale cache maps the original metrics' ids: Lightning cannot find the copied metrics
        with pytest.raises(Exception, match="Could not find the `LightningModule` attribute"):
            validate(copier.clone, datamodule=digits8, verbose=False)


@pytest.mark.parametrize(
    ("call", "path"),
    [
        (lambda: lightning_internals.loaded_checkpoint(SimpleNamespace()), "_checkpoint_connector._loaded_checkpoint"),
        (lambda: lightning_internals.fit_train_dataloader(SimpleNamespace(fit_loop=1)), "fit_loop._data_source"),
        (lambda: lightning_internals.eval_data_source(SimpleNamespace(), "test"), "test_loop._data_source.instance"),
        (lambda: lightning_internals.forget_metric_attributes(SimpleNamespace()), "_metric_attributes"),
    ],
)
def test_a_renamed_attribute_is_a_loud_error_naming_it_and_the_lightning_version(call, path):
    with pytest.raises(LightningInternalsError, match=rf"`SimpleNamespace\.{path}`.*Lightning {pl.__version__}"):
        call()


def test_qat_fit_with_plain_dataloaders_evaluates_with_them(tmp_path, digits8):
    """No datamodule: the example input and the final evaluation both come through the seam."""
    qat = QATCallback(freeze_bn_after=0, freeze_observers_after=1, export=[], latency_repeats=1)
    _fit(
        tmp_path,
        BoringClassifier(),
        [qat],
        train_dataloaders=digits8.train_dataloader(),
        val_dataloaders=digits8.val_dataloader(),
    )
    assert qat.state.example_inputs[0].shape == (64, 1, 8, 8)
    assert set(qat.report.metrics) == {"float", "qat", "int8"}
    assert 0 < qat.report.metrics["int8"]["val_acc"] <= 1
