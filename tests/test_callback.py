import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from conftest import BoringClassifier, ShapeBranch, TinyNet, UntraceableNet, pretrained_tiny, trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_qat.quantization.convert
from lightning_qat import QATCallback, load_quantized
from lightning_qat.exceptions import ConversionError
from lightning_qat.quantization import ao, pt2e
from lightning_qat.quantization.backends import default_backend


def _bn_frozen(net) -> bool:
    flags = [m.freeze_bn for m in net.modules() if ao.is_conv_bn_qat(m)]
    assert flags
    assert len(set(flags)) == 1
    return flags[0]


def _observers_on(net) -> bool:
    flags = {bool(fq.observer_enabled[0]) for _, fq in ao.fake_quant_modules(net)}
    assert len(flags) == 1
    return flags.pop()


class FlagRecorder(Callback):
    """Records (counter, bn frozen, observers on) at the start of each epoch / batch, after QATCallback ran."""

    def __init__(self):
        self.epochs, self.steps = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append((trainer.current_epoch, _bn_frozen(pl_module.net), _observers_on(pl_module.net)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((trainer.global_step, _bn_frozen(pl_module.net), _observers_on(pl_module.net)))


class ObserverWatcher(Callback):
    """Snapshots every observer buffer when validation starts and compares when it ends."""

    def __init__(self):
        self.checked = 0

    def _buffers(self, pl_module):
        return {
            k: v.clone()
            for k, v in pl_module.net.state_dict().items()
            if "activation_post_process" in k and k.endswith(("min_val", "max_val", "scale", "zero_point"))
        }

    def on_validation_start(self, trainer, pl_module):
        self.before = self._buffers(pl_module)

    def on_validation_end(self, trainer, pl_module):
        after = self._buffers(pl_module)
        assert self.before.keys() == after.keys()
        assert self.before
        for key, value in self.before.items():
            assert torch.equal(value, after[key]), (key, self.checked, value, after[key])
        self.checked += 1


def _fit(tmp_path, datamodule, model=None, callbacks=(), **kwargs):
    pl.seed_everything(0)
    model = model or BoringClassifier()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=list(callbacks), **kwargs))
    trainer.fit(model, datamodule=datamodule)
    return trainer, model


def test_initial_state_and_defaults():
    qat = QATCallback()
    assert qat.backend == default_backend()
    assert (qat.engine, qat.interval, qat.evaluate) == ("auto", "epoch", "val")
    assert qat.freeze_bn_after < qat.freeze_observers_after  # BN frozen before observers, as torchvision does
    assert qat.quantized_model is None
    assert qat.report is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "tensorrt"}, r"'tensorrt'.*\['x86', 'fbgemm', 'qnnpack', 'xnnpack'\]"),
        ({"engine": "graph"}, r"engine='graph'.*\['auto', 'fx', 'eager', 'pt2e', 'xnnpack'\]"),
        ({"interval": "batch"}, r"interval='batch'.*\['epoch', 'step'\]"),
        ({"freeze_bn_after": 1.5}, r"freeze_bn_after=1\.5.*float in \(0, 1\)"),
        ({"freeze_observers_after": -1}, r"freeze_observers_after=-1.*int >= 0"),
        ({"evaluate": "train"}, r"evaluate='train'.*\['val', 'test', None\]"),
        ({"on_drop": "ignore"}, r"on_drop='ignore'.*\['warn', 'raise', 'fallback'\]"),
        ({"on_drop": "fallback", "monitor": "val_acc"}, r"on_drop='fallback' needs max_metric_drop"),
        ({"fallback_at": "sometimes"}, r"fallback_at='sometimes'.*'bn'.*'end'.*int >= 1.*float in \(0, 1\)"),
        ({"fallback_at": 0}, r"fallback_at=0 is invalid"),
        ({"fallback_at": 1}, r"fallback_at=1 only acts with on_drop='fallback' \(on_drop='warn'\)"),
        ({"ptq_batches": 4}, r"ptq_batches=4 only acts with ptq_baseline=True"),
        ({"ptq_batches": 0, "ptq_baseline": True}, r"ptq_batches=0 must be an int >= 1"),
        ({"max_metric_drop": 0.01}, r"max_metric_drop=0\.01.*monitor"),
        ({"skip": "fc"}, r"skip='fc'.*list of submodule names"),
        ({"relu6_to_relu": "yes"}, r"relu6_to_relu='yes'.*True or False"),
        ({"activations": "int4"}, r"activations=.int4.*\[.auto., .static., .dynamic.\]"),
    ],
)
def test_bad_arguments_name_value_and_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QATCallback(**kwargs)


def test_fraction_without_finite_trainer_length_fails(tmp_path, digits8):
    with pytest.raises(ValueError, match=r"freeze_bn_after=0\.5 is a fraction.*max_epochs"):
        _fit(tmp_path, digits8, callbacks=[QATCallback()], max_epochs=-1, max_steps=-1, limit_train_batches=1)


def test_bad_module_name_fails_in_setup(tmp_path, digits8):
    with pytest.raises(ValueError, match=r"module='netz'.*did you mean.*'net'"):
        _fit(tmp_path, digits8, callbacks=[QATCallback(module="netz")], max_epochs=1)


def test_optimizer_holds_the_prepared_parameters(tmp_path, digits8):
    qat = QATCallback(evaluate=None, export=[])
    trainer, model = _fit(tmp_path, digits8, callbacks=[qat], max_epochs=1, limit_train_batches=2)
    assert isinstance(model.net, torch.fx.GraphModule)
    assert any(ao.is_conv_bn_qat(m) for m in model.net.modules())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    assert optimized >= {id(p) for p in model.net.parameters()}


@pytest.mark.parametrize(("bn", "obs"), [(1, 2), (0.3, 0.6)])
def test_epoch_schedule_freezes_exactly_at_the_scheduled_epoch(tmp_path, digits8, bn, obs):
    recorder = FlagRecorder()
    qat = QATCallback(freeze_bn_after=bn, freeze_observers_after=obs, evaluate=None, export=[])
    _fit(tmp_path, digits8, callbacks=[qat, recorder], max_epochs=3, limit_train_batches=2)
    assert recorder.epochs == [(0, False, True), (1, True, True), (2, True, False)]


@pytest.mark.parametrize(("bn", "obs"), [(3, 5), (0.5, 0.8)])
def test_step_schedule_freezes_exactly_at_the_scheduled_step(tmp_path, digits8, bn, obs):
    recorder = FlagRecorder()
    qat = QATCallback(freeze_bn_after=bn, freeze_observers_after=obs, interval="step", evaluate=None, export=[])
    _fit(tmp_path, digits8, callbacks=[qat, recorder], max_steps=6, limit_train_batches=4)
    expected = [(s, s >= 3, s < 5) for s in range(6)]
    assert recorder.steps == expected


def test_observers_do_not_move_during_validation_and_are_restored(tmp_path, digits8):
    watcher = ObserverWatcher()
    recorder = FlagRecorder()
    qat = QATCallback(freeze_bn_after=None, freeze_observers_after=None, evaluate=None, export=[])
    _fit(
        tmp_path,
        digits8,
        callbacks=[qat, watcher, recorder],
        max_epochs=2,
        limit_train_batches=2,
        num_sanity_val_steps=1,
    )
    assert watcher.checked == 3  # sanity check + 2 epochs
    assert all(on for _, _, on in recorder.epochs)  # training observes again after validation


def test_int8_model_agrees_with_qat_model_on_digits(tmp_path, digits8, float_tiny):
    qat = QATCallback(freeze_bn_after=1, freeze_observers_after=2, evaluate=None, export=[], skip=["fc2"])
    trainer, model = _fit(tmp_path, digits8, model=pretrained_tiny(float_tiny), callbacks=[qat], max_epochs=3)
    int8 = qat.quantized_model
    assert next(int8.parameters()).device.type == "cpu"
    assert type(int8.fc2.module) is torch.nn.Linear  # skipped: float
    assert qat.report.kept_float == [{"name": "fc2", "why": "skip=", "by": "you"}]
    assert isinstance(int8.conv1, torch.ao.nn.intrinsic.quantized.ConvReLU2d)
    assert isinstance(int8.fc1, torch.ao.nn.intrinsic.quantized.LinearReLU)
    assert isinstance(model.net, torch.fx.GraphModule)
    assert ao.fake_quant_modules(model.net)
    x, _ = digits8.splits["val"].tensors
    model.eval()
    with torch.no_grad(), ao.quiet():
        agree = (int8(x).argmax(1) == model.net.cpu()(x).argmax(1)).float().mean().item()
    assert agree >= 0.97


def test_eager_fallback_end_to_end(tmp_path, digits8, float_tiny):
    qat = QATCallback(freeze_bn_after=1, freeze_observers_after=2, evaluate=None, export=[])
    _, model = _fit(tmp_path, digits8, model=pretrained_tiny(float_tiny, UntraceableNet), callbacks=[qat], max_epochs=2)
    assert qat.prepared.mode == "eager"
    x, _ = digits8.splits["val"].tensors
    with torch.no_grad(), ao.quiet():
        int8_pred = qat.quantized_model(x).argmax(1)
        qat_pred = model.net.cpu().eval()(x).argmax(1)
    assert (int8_pred == qat_pred).float().mean().item() >= 0.97


def test_fx_resnet18_end_to_end_on_32px_digits(tmp_path, digits32):
    model = BoringClassifier(torchvision.models.resnet18(num_classes=10))
    qat = QATCallback(freeze_bn_after=1, freeze_observers_after=1, evaluate=None, export=[])
    _fit(tmp_path, digits32, model=model, callbacks=[qat], max_epochs=2, limit_train_batches=3)
    assert qat.prepared.mode == "fx"
    assert qat.prepared.num_fused == 20
    assert sum(ao.is_quantized_module(m) for m in qat.quantized_model.modules()) >= 20


class BreakConverterAfterTraining(Callback):
    """The converter breaks only after the preflight passed: a failure no check could have seen."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def on_train_end(self, trainer, pl_module):
        def broken(module, *_):
            raise RuntimeError("simulated converter bug")

        self.monkeypatch.setattr(lightning_qat.quantization.convert.ao, "convert_fx", broken)


def test_failed_conversion_keeps_qat_model_and_checkpoints(tmp_path, digits8, monkeypatch):
    qat = QATCallback(evaluate=None)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    model = BoringClassifier()
    with pytest.raises(ConversionError, match="simulated converter bug.*unchanged"):
        _fit(
            tmp_path,
            digits8,
            model=model,
            callbacks=[qat, ckpt, BreakConverterAfterTraining(monkeypatch)],
            max_epochs=1,
            limit_train_batches=2,
            enable_checkpointing=True,
        )
    assert list((tmp_path / "ckpt").glob("*.ckpt"))
    assert isinstance(model.net, torch.fx.GraphModule)
    assert ao.fake_quant_modules(model.net)
    assert qat.quantized_model is None


def test_no_torch_quantization_deprecation_reaches_the_user(tmp_path, digits8):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(
            tmp_path,
            digits8,
            model=BoringClassifier(TinyNet()),
            callbacks=[QATCallback()],
            max_epochs=1,
            limit_train_batches=2,
        )
    leaked = [str(w.message)[:80] for w in caught if "quantiz" in str(w.message).lower()]
    assert leaked == []


SIGTERM_JOB = """
import sys, time
from pathlib import Path
import lightning.pytorch as pl
from conftest import BoringClassifier, trainer_kwargs
from lightning_qat import FinishPipeline, QATCallback
from lightning_qat.app.data import DigitsDataModule

class SlowPipeline(FinishPipeline):
    def evaluate_networks(self, report):
        Path(sys.argv[2]).touch()  # the test sends SIGTERM now
        time.sleep(120)
        super().evaluate_networks(report)

class SlowEvaluation(QATCallback):
    pipeline_class = SlowPipeline

qat = SlowEvaluation(save_dir=sys.argv[1], latency_repeats=1)
trainer = pl.Trainer(**trainer_kwargs(".", max_epochs=1, limit_train_batches=2, callbacks=[qat]))
trainer.fit(BoringClassifier(), datamodule=DigitsDataModule(image_size=8, channels=1))
"""


def _terminated(tmp_path, script, started, *args):
    """Run ``script`` as a user's job, send it SIGTERM once it creates ``started``; its exit code and stderr."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    job = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not started.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert started.exists(), job.communicate()[1][-3000:]
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    return job.returncode, stderr


def test_sigterm_during_the_final_evaluation_exits_nonzero_and_keeps_the_artifact(tmp_path):
    out, started = tmp_path / "out", tmp_path / "evaluating"
    returncode, stderr = _terminated(tmp_path, SIGTERM_JOB, started, out, started)
    assert returncode != 0
    assert "EvaluationInterrupted" in stderr
    assert "SIGTERM received during the QAT end of fit" in stderr
    report = json.loads((out / "qat_report.json").read_text())
    assert report["status"].startswith("failed during evaluation (EvaluationInterrupted")
    assert report["artifact"] == str(out / "model_int8.pt")
    assert load_quantized(out / "model_int8.pt") is not None


def test_a_single_epoch_run_freezes_on_the_default_fractions_of_its_steps(tmp_path, digits8):
    recorder = FlagRecorder()
    qat = QATCallback(evaluate=None, export=[])
    _fit(tmp_path, digits8, callbacks=[qat, recorder], max_epochs=1, limit_train_batches=8)
    assert recorder.steps == [(s, s >= 4, s < 6) for s in range(8)]


def test_one_callback_two_fits_freezes_in_both_and_refuses_a_prepared_network(tmp_path, digits8):
    qat = QATCallback(freeze_bn_after=1, freeze_observers_after=1, evaluate=None, export=[])
    first_recorder, second_recorder = FlagRecorder(), FlagRecorder()
    _fit(tmp_path, digits8, callbacks=[qat, first_recorder], max_epochs=2, limit_train_batches=2)
    _, model = _fit(tmp_path, digits8, callbacks=[qat, second_recorder], max_epochs=2, limit_train_batches=2)
    assert first_recorder.epochs == second_recorder.epochs == [(0, False, True), (1, True, False)]
    with pytest.raises(ValueError, match=r"`net` is already QAT-prepared.*trainer\.fit\(MyModule\(\), ckpt_path"):
        _fit(tmp_path, digits8, model=model, callbacks=[QATCallback()], max_epochs=1)


def test_a_fit_that_never_trained_refuses_to_convert_uncalibrated_observers(tmp_path, digits8):
    qat = QATCallback(save_dir=str(tmp_path / "out"), latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=0, callbacks=[qat]))
    with pytest.raises(ConversionError, match=r"fake-quant observers never saw data .*Train at least one step"):
        trainer.fit(BoringClassifier(), datamodule=digits8)
    assert not (tmp_path / "out" / "model_int8.pt").exists()


PREFLIGHT_SIGTERM_JOB = """
import sys, time
from pathlib import Path
import lightning.pytorch as pl
from conftest import BoringClassifier, trainer_kwargs
from lightning_qat import QATCallback
from lightning_qat.app.data import DigitsDataModule

class SlowFirstValidation(BoringClassifier):
    def validation_step(self, batch, batch_idx):
        flag = Path(sys.argv[2])
        if not flag.exists():  # the first call is the preflight's, in setup
            flag.touch()  # the test sends SIGTERM now
            time.sleep(120)
        return super().validation_step(batch, batch_idx)

class CountSteps(pl.Callback):
    def on_train_batch_start(self, *args):
        Path(sys.argv[3]).touch()

qat = QATCallback(save_dir=sys.argv[1], latency_repeats=1)
trainer = pl.Trainer(**trainer_kwargs(".", max_epochs=1, limit_train_batches=2, callbacks=[qat, CountSteps()]))
trainer.fit(SlowFirstValidation(), datamodule=DigitsDataModule(image_size=8, channels=1))
"""


def test_sigterm_during_the_preflight_evaluation_ends_the_run_nonzero_before_training(tmp_path):
    out, started, trained = tmp_path / "out", tmp_path / "preflight", tmp_path / "trained"
    returncode, stderr = _terminated(tmp_path, PREFLIGHT_SIGTERM_JOB, started, out, started, trained)
    assert returncode != 0
    assert "SIGTERM received during the QAT preflight" in stderr
    assert not trained.exists()  # no training step ran after the signal
    assert not (out / ".lightning_qat.claim").exists()


@pytest.mark.parametrize(
    ("old", "new", "other"),
    [
        ({"mode": "eager"}, {"engine": "eager"}, {"engine": "fx"}),
        ({"convert": "best"}, {"weights": "best"}, {"weights": "best"}),
        ({"save_artifact": False}, {"export": []}, {"export": ["torchscript"]}),
    ],
)
def test_the_old_argument_names_still_work_for_one_release_and_say_so(old, new, other):
    (old_name,), ((name, value),) = old, new.items()
    with pytest.deprecated_call(match=rf"QATCallback\({old_name}=\.\.\.\) is deprecated: use {name}="):
        qat = QATCallback(**old)
    assert getattr(qat, name) == value
    with pytest.raises(ValueError, match=rf"{old_name}=.* and {name}=.* are one setting: give {name} only"):
        QATCallback(**old, **other)


@pytest.mark.skipif(pt2e.missing() is not None, reason=f"PT2E engine: {pt2e.missing()}")
@pytest.mark.parametrize(("export", "engine", "written"), [(None, "pt2e", ["pt2"]), (["torchscript"], "eager", None)])
def test_auto_takes_the_engine_that_takes_the_network_and_the_artifact_follows_it(
    tmp_path, digits8, export, engine, written
):
    """torch.fx cannot trace ShapeBranch: PT2E takes it and ships its `.pt2`, unless TorchScript was named."""
    qat = QATCallback(export=export, evaluate=None, latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, fast_dev_run=True, callbacks=[qat]))
    trainer.fit(BoringClassifier(ShapeBranch()), datamodule=digits8)
    assert qat.prepared.mode == engine
    assert qat.export == (written or export)
