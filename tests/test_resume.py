import lightning.pytorch as pl
import pytest
import torch
from conftest import (
    OUTLIER_BUDGET,
    AtrousNet,
    BoringClassifier,
    pretrained_tiny,
    trainer_kwargs,
    with_outlier_channels,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qat import QATCallback, convert_checkpoint
from lightning_qat.exceptions import CheckpointError
from lightning_qat.quantization import ao


def _qat(**kwargs):
    return QATCallback(freeze_bn_after=1, freeze_observers_after=2, evaluate=None, export=[], **kwargs)


def _run(tmp_path, digits8, float_tiny, max_epochs, qat, ckpt_path=None, checkpoint=None):
    pl.seed_everything(0)
    model = pretrained_tiny(float_tiny)
    callbacks = [qat] + ([checkpoint] if checkpoint else [])
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=bool(checkpoint))
    )
    trainer.fit(model, datamodule=digits8, ckpt_path=ckpt_path)
    return model


def _qparams(net):
    return {name: (fq.scale.clone(), fq.zero_point.clone()) for name, fq in ao.fake_quant_modules(net)}


def test_resume_after_epoch_1_equals_an_uninterrupted_run(tmp_path, digits8, float_tiny):
    full_qat = _qat()
    full = _run(tmp_path / "full", digits8, float_tiny, 3, full_qat)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _run(tmp_path / "part", digits8, float_tiny, 1, _qat(), checkpoint=checkpoint)
    resumed_qat = _qat()
    resumed = _run(tmp_path / "resume", digits8, float_tiny, 3, resumed_qat, ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    assert (resumed_qat.freezing.bn_frozen, resumed_qat.freezing.observers_frozen) == (True, True)
    assert [m.freeze_bn for m in resumed.net.modules() if ao.is_conv_bn_qat(m)] == [True, True]
    full_q, resumed_q = _qparams(full.net), _qparams(resumed.net)
    assert full_q.keys() == resumed_q.keys()
    for name, (scale, zero_point) in full_q.items():
        torch.testing.assert_close(resumed_q[name][0], scale, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(resumed_q[name][1], zero_point), name
    x, _ = digits8.splits["val"].tensors
    with torch.no_grad(), ao.quiet():
        torch.testing.assert_close(resumed_qat.quantized_model(x), full_qat.quantized_model(x), rtol=1e-3, atol=0.05)


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"backend": "fbgemm"}, r"prepared with backend='x86'.*backend='fbgemm'"),
        ({"skip": ["fc2"]}, r"prepared with skip=\[\].*skip=\['fc2'\]"),
    ],
)
def test_resume_with_another_configuration_fails_clearly_and_keeps_the_checkpoint(
    tmp_path, digits8, float_tiny, changed, message
):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _run(tmp_path / "part", digits8, float_tiny, 1, _qat(), checkpoint=checkpoint)
    files = {p: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    with pytest.raises(CheckpointError, match=message):
        _run(
            tmp_path / "resume",
            digits8,
            float_tiny,
            3,
            _qat(**changed),
            ckpt_path=tmp_path / "ckpt" / "last.ckpt",
            checkpoint=ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
        )
    assert {p: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == files


def test_state_dict_holds_the_preparation_and_refuses_another_one():
    qat = _qat(backend="fbgemm")
    state = qat.state_dict()
    assert state == {
        "version": 1,
        "backend": "fbgemm",
        "mode": None,
        "kernels": None,
        "module": None,
        "skip": [],
        "relu6_to_relu": False,
        "float_state_dict": None,
        "example_inputs": None,
        "activations": "static",
        "activation_ms": {},
        "speed": {"ms": {}, "kept": {}},
        "fallback": [],
        "fallback_searched": False,
        "fallback_met": None,
        "fallback_candidates": [],
        "fallback_seconds": 0.0,
    }
    qat.load_state_dict(state)  # the same settings
    qat.load_state_dict({})  # a checkpoint from before these keys
    with pytest.raises(CheckpointError, match=r"prepared with relu6_to_relu=True.*now has relu6_to_relu=False"):
        qat.load_state_dict(state | {"relu6_to_relu": True})
    with pytest.raises(CheckpointError, match=r"version 2, newer .* upgrade lightning-qat"):
        qat.load_state_dict(state | {"version": 2})


def test_a_resumed_run_keeps_the_layers_a_search_kept_float_and_does_not_search_again(tmp_path, digits8, float_tiny):
    def budget_qat():
        return QATCallback(
            monitor="val_acc",
            max_metric_drop=OUTLIER_BUDGET,
            on_drop="fallback",
            fallback_at=1,
            interval="step",
            export=[],
        )

    def outlier_model():
        pl.seed_everything(0)
        model = with_outlier_channels(pretrained_tiny(float_tiny))
        model.lr = 0.0  # QAT adapts BatchNorm statistics only (test_finish.py)
        return model

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = budget_qat()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path / "part", max_epochs=1, callbacks=[first, checkpoint], enable_checkpointing=True)
    )
    trainer.fit(outlier_model(), datamodule=digits8)
    assert first.budget.fallback == ["conv1"]
    assert first.budget.searched

    resumed = budget_qat()
    searches = []
    resumed._search_fallback = lambda *args: searches.append(args)  # noqa: SLF001 - must not run again
    model = outlier_model()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "resume", max_epochs=2, callbacks=[resumed]))
    trainer.fit(model, datamodule=digits8, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert searches == []
    assert resumed.budget.fallback == first.budget.fallback
    assert resumed.report.fallback == ["conv1", "conv2"]
    off = {name for name, fq in ao.fake_quant_modules(model.net) if not fq.fake_quant_enabled[0]}
    assert {"conv1.weight_fake_quant", "conv2.weight_fake_quant"} <= off  # trained float after the resume too
    assert resumed.report.fallback_candidates[0]["when"] == "fit start"  # before the first step


def _cpu(monkeypatch, slow: bool) -> None:
    """A CPU whose int8 kernel for dilated depthwise convolutions is slow (AtrousNet's atrous.0 stays float), or not."""
    monkeypatch.setattr(ao, "depthwise_slowdown", lambda backend, shape: 100.0 if slow and shape[3] == (2, 2) else 1.0)


def test_a_checkpoint_keeps_the_graph_its_cpu_chose_on_a_cpu_that_would_choose_otherwise(
    tmp_path, digits8, monkeypatch
):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _cpu(monkeypatch, slow=True)
    first = _qat(latency_repeats=1)
    trainer = pl.Trainer(
        **trainer_kwargs(
            tmp_path / "a",
            max_epochs=1,
            limit_train_batches=3,
            callbacks=[first, checkpoint],
            enable_checkpointing=True,
        )
    )
    trainer.fit(BoringClassifier(AtrousNet()), datamodule=digits8)
    assert list(first.prepared.kernels) == ["atrous.0"]

    _cpu(monkeypatch, slow=False)  # another machine: here the layer would be int8, another graph
    resumed = _qat(latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "b", max_epochs=2, limit_train_batches=3, callbacks=[resumed]))
    trainer.fit(BoringClassifier(AtrousNet()), datamodule=digits8, ckpt_path=checkpoint.last_model_path)
    assert list(resumed.prepared.kernels) == ["atrous.0"]
    assert trainer.global_step == 6  # it did resume and train
    by_engine = [entry["name"] for entry in resumed.report.kept_float if entry["by"] == "engine"]
    assert by_engine == ["atrous.0"]

    tested = QATCallback(latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "c", callbacks=[tested]))
    trainer.validate(BoringClassifier(AtrousNet()), datamodule=digits8, ckpt_path=checkpoint.last_model_path)
    assert list(tested.prepared.kernels) == ["atrous.0"]

    converted = convert_checkpoint(
        BoringClassifier(AtrousNet()), checkpoint.last_model_path, datamodule=digits8, save_dir=str(tmp_path / "d")
    )
    assert [entry["name"] for entry in converted.kept_float if entry["by"] == "engine"] == ["atrous.0"]
