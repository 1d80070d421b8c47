"""Each case here used to train to the end and then fail; now it stops in `setup`, before any training step."""

import collections
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import BoringClassifier, TinyNet, trainer_kwargs
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_qat import QATCallback
from lightning_qat.exceptions import PreflightError


class StepCounter(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1


class FeaturesAndHead(nn.Module):
    """torchvision-like: `features`, `classifier`, and a method of its own; `num_classes` an attribute."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Linear(16, 10)
        self.num_classes = 10

    def embed(self, x):
        return self.features(x).mean((2, 3))

    def forward(self, x):
        return self.classifier(self.embed(x))


class CallsSubmodules(BoringClassifier):
    def __init__(self):
        super().__init__(FeaturesAndHead())

    def forward(self, x):
        return self.net.classifier(self.net.features(x).mean((2, 3)))


class CallsAMethod(BoringClassifier):
    def __init__(self):
        super().__init__(FeaturesAndHead())

    def forward(self, x):
        return self.net.classifier(self.net.embed(x))


class ReadsAnAttribute(BoringClassifier):
    def __init__(self):
        super().__init__(FeaturesAndHead())

    def forward(self, x):
        return self.net(x)[:, : self.net.num_classes]


class TwoInputNet(nn.Module):
    """Image plus a metadata vector: the batch's first element alone is not its input."""

    def __init__(self):
        super().__init__()
        self.image = TinyNet()
        self.meta = nn.Linear(3, 10)

    def forward(self, x, meta):
        return self.image(x) + self.meta(meta)


class TwoInputClassifier(BoringClassifier):
    def __init__(self):
        super().__init__(TwoInputNet())

    def forward(self, x):
        return self.net(x, torch.zeros(x.shape[0], 3))


class EagerAddNet(TinyNet):
    """FX cannot trace it; in eager mode its `x + x` cannot run on quantized tensors."""

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        if x.shape[-1] > 2:
            x = x + x
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(self.relu3(self.fc1(x)))


class EagerAddClassifier(BoringClassifier):
    def __init__(self):
        super().__init__(EagerAddNet())


class NoValidationStep(BoringClassifier):
    validation_step = pl.LightningModule.validation_step


class ReadsWeightInValidation(BoringClassifier):
    def validation_step(self, batch, batch_idx):
        self.log("fc2_norm", self.net.fc2.weight.norm())  # a method on the int8 Linear, not a tensor
        return super().validation_step(batch, batch_idx)


class NoTestData(pl.LightningDataModule):
    def __init__(self, dm):
        super().__init__()
        self.dm = dm

    def train_dataloader(self):
        return self.dm.train_dataloader()

    def val_dataloader(self):
        return self.dm.val_dataloader()


CASES = {
    "calls submodules": (
        CallsSubmodules,
        {},
        {},
        r"calls `self\.net\.classifier\(\.\.\.\)` \(and features\).*module='net\.classifier'",
    ),
    "calls a method": (CallsAMethod, {}, {}, r"calls `self\.net\.classifier\(\.\.\.\)` \(and embed\).*its forward"),
    "two inputs": (TwoInputClassifier, {}, {}, r"example input \(shapes \[\(64, 1, 8, 8\)\]\).*example_input_array"),
    # "auto" takes PT2E for it now (torch.export captures it); eager's refusal is what is tested here
    "eager x + x": (
        EagerAddClassifier,
        {"engine": "eager"},
        {},
        r"conversion would fail.*QuantizedCPU.*FloatFunctional",
    ),
    "no validation_step": (NoValidationStep, {}, {}, r"evaluate='val'.*has none: define `validation_step`"),
    "no test data": (BoringClassifier, {"evaluate": "test"}, {}, r"needs test data.*test_dataloader"),
    "validation_step reads a weight": (ReadsWeightInValidation, {}, {}, r"`validation_step` fails on the int8"),
    "bf16-mixed": (BoringClassifier, {}, {"precision": "bf16-mixed"}, r"precision='bf16-mixed'.*'32-true'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_late_failures_now_stop_in_setup_with_the_fix(tmp_path, digits8, case):
    model_fn, qat_kwargs, extra, match = CASES[case]
    counter = StepCounter()
    datamodule = NoTestData(digits8) if case == "no test data" else digits8
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, callbacks=[QATCallback(**qat_kwargs), counter]) | extra
    )
    with pytest.raises(PreflightError, match=match):
        trainer.fit(model_fn(), datamodule=datamodule)
    assert counter.steps == 0


def test_a_plain_attribute_of_the_network_still_reads_after_preparation(tmp_path, digits8):
    qat = QATCallback(evaluate=None, export=[], latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[qat]))
    model = ReadsAnAttribute()
    trainer.fit(model, datamodule=digits8)
    assert qat.prepared.mode == "fx"
    assert model.net.num_classes == 10


@pytest.mark.parametrize("save_dir", ["file", "unwritable"])
def test_a_save_dir_that_cannot_take_the_artifact_stops_in_setup(tmp_path, digits8, save_dir):
    target = tmp_path / "out"
    if save_dir == "file":
        target.write_text("a file, not a directory")
    elif os.geteuid() != 0:
        target.mkdir()
        target.chmod(0o500)  # stops this user's writes (the test itself writes nothing into it)
    elif Path("/sys/kernel").is_dir():
        target = Path("/sys/kernel")  # root ignores file modes; sysfs refuses a new file to root too
    else:
        pytest.skip("running as root without sysfs: no directory here refuses root's writes")
    counter = StepCounter()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, callbacks=[QATCallback(save_dir=str(target)), counter])
    )
    with pytest.raises(ValueError, match=rf"save_dir='{target}' is not a writable directory"):
        trainer.fit(BoringClassifier(), datamodule=digits8)
    assert counter.steps == 0


def test_a_compiled_network_is_prepared_through_its_original_module(tmp_path, digits8):
    model = BoringClassifier(torch.compile(TinyNet()))
    qat = QATCallback(evaluate=None, export=[], latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[qat]))
    with pytest.warns(UserWarning, match="torch.compile'd; QAT prepares and trains its original module"):
        trainer.fit(model, datamodule=digits8)
    assert qat.prepared.mode == "fx"
    assert isinstance(model.net, torch.fx.GraphModule)
    assert qat.quantized_model is not None


def test_two_runs_without_a_logger_keep_both_artifacts(tmp_path, digits8):
    paths = []
    for _ in range(2):
        qat = QATCallback(evaluate=None, latency_repeats=1)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[qat]))
        trainer.fit(BoringClassifier(), datamodule=digits8)
        paths.append(qat.artifact_path)
    assert paths == [tmp_path / "qat" / "version_0" / "model_int8.pt", tmp_path / "qat" / "version_1" / "model_int8.pt"]
    assert all(p.is_file() for p in paths)


def test_reusing_a_save_dir_is_refused_before_training_unless_overwrite(tmp_path, digits8):
    def fit(**kwargs):
        qat = QATCallback(evaluate=None, latency_repeats=1, save_dir=str(tmp_path / "out"), **kwargs)
        trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[qat]))
        trainer.fit(BoringClassifier(), datamodule=digits8)
        return qat

    first = fit().artifact_path.read_bytes()
    with pytest.raises(PreflightError, match=r"already holds an earlier run's \['model_int8.pt', 'qat_report.json'\]"):
        fit()
    assert (tmp_path / "out" / "model_int8.pt").read_bytes() == first
    assert fit(overwrite=True).artifact_path.is_file()


def drop_rows(x, p, training):
    """A hand-written stochastic depth on a Python bool: FX traces into it and keeps the branch it took."""
    if not training:
        return x
    return x * (torch.rand_like(x[:, :1, :1, :1]) > p).float() / (1 - p)


class StochasticFunctionNet(TinyNet):
    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        x = drop_rows(x, 0.5, self.training)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(self.relu3(self.fc1(x)))


class TracedIntoStochasticDepth(BoringClassifier):
    def __init__(self):
        super().__init__(StochasticFunctionNet())


def test_a_network_that_would_be_random_in_eval_stops_in_setup(tmp_path, digits8):
    counter = StepCounter()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[QATCallback(), counter]))
    with pytest.raises(PreflightError, match=r"random in eval\(\) though the float one is not.*nn\.Dropout"):
        trainer.fit(TracedIntoStochasticDepth(), datamodule=digits8)
    assert counter.steps == 0


def test_a_directory_where_the_artifact_goes_stops_in_setup_even_with_overwrite(tmp_path, digits8):
    (tmp_path / "out" / "model_int8.pt").mkdir(parents=True)
    counter = StepCounter()
    qat = QATCallback(save_dir=str(tmp_path / "out"), overwrite=True)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[qat, counter]))
    with pytest.raises(PreflightError, match=r"\['model_int8.pt'\] that is not a file"):
        trainer.fit(BoringClassifier(), datamodule=digits8)
    assert counter.steps == 0


class LogsMonitorPerStepOnly(BoringClassifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), on_step=True, on_epoch=False)
        self.log("val_loss", self.loss(self(x), y))


def test_a_monitor_the_final_evaluation_cannot_collect_stops_in_setup(tmp_path, digits8):
    counter = StepCounter()
    qat = QATCallback(monitor="val_acc", max_metric_drop=0.01, on_drop="raise", export=[])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[qat, counter]))
    with pytest.raises(PreflightError, match=r"monitor='val_acc' is not among .*\['val_loss'\].*on_epoch=True"):
        trainer.fit(LogsMonitorPerStepOnly(), datamodule=digits8)
    assert counter.steps == 0


Logits = collections.namedtuple("Logits", ["logits", "features"])


class NamedTupleNet(TinyNet):
    def forward(self, x):
        logits = super().forward(x)
        return Logits(logits, logits.detach())


class NamedTupleClassifier(BoringClassifier):
    def forward(self, x):
        return self.net(x).logits


@pytest.mark.parametrize("save_artifact", [True, False])
def test_a_namedtuple_output_the_artifact_would_lose_stops_in_setup(tmp_path, digits8, save_artifact):
    counter = StepCounter()
    qat = QATCallback(evaluate=None, export=None if save_artifact else [], latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[qat, counter]))
    if save_artifact:
        with pytest.raises(PreflightError, match=r"returns a Logits \(a namedtuple\).*`\.logits` would be gone"):
            trainer.fit(NamedTupleClassifier(NamedTupleNet()), datamodule=digits8)
        assert counter.steps == 0
    else:  # no artifact: nothing to lose
        trainer.fit(NamedTupleClassifier(NamedTupleNet()), datamodule=digits8)
        assert counter.steps == 2


def test_a_lone_conv_as_the_module_is_quantized_and_no_warning_says_otherwise(tmp_path, digits8, recwarn):
    net = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())
    qat = QATCallback(module="net.0", evaluate=None, export=[], latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[qat]))
    trainer.fit(BoringClassifier(net), datamodule=digits8)
    assert qat.report.quantized_layers >= 1
    assert not [w for w in recwarn if "is quantizable" in str(w.message)]


HOLDER = """
import sys, time
from lightning_qat.files import claim
claim(sys.argv[1])
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_second_run_into_a_claimed_save_dir_stops_in_setup_and_a_killed_run_does_not_block(tmp_path, digits8):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"  # a run that passed setup and has not written yet
        counter = StepCounter()
        trainer = pl.Trainer(
            **trainer_kwargs(tmp_path, max_epochs=1, callbacks=[QATCallback(save_dir=str(out)), counter])
        )
        with pytest.raises(PreflightError, match=rf"being written by another run \(process {holder.pid} on "):
            trainer.fit(BoringClassifier(), datamodule=digits8)
        assert counter.steps == 0
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its claim is a leftover, taken over; the run ends with its artifact and no claim
    qat = QATCallback(save_dir=str(out), evaluate=None, latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[qat]))
    trainer.fit(BoringClassifier(), datamodule=digits8)
    assert (out / "model_int8.pt").is_file()
    assert not (out / ".lightning_qat.claim").exists()


class FailsInTraining(BoringClassifier):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("a bug in the training step")


def test_a_run_that_fails_after_setup_releases_its_claim(tmp_path, digits8):
    out = tmp_path / "out"
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[QATCallback(save_dir=str(out))]))
    with pytest.raises(RuntimeError, match="a bug in the training step"):
        trainer.fit(FailsInTraining(), datamodule=digits8)
    assert not (out / ".lightning_qat.claim").exists()
    qat = QATCallback(save_dir=str(out), evaluate=None, latency_repeats=1)  # the same process, the same save_dir
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[qat])).fit(
        BoringClassifier(), datamodule=digits8
    )
    assert (out / "model_int8.pt").is_file()
