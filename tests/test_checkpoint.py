"""QAT checkpoints used the ways users use them: evaluated, predicted, loaded and converted in new processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import BoringClassifier, pretrained_tiny, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qat import QATCallback, convert_checkpoint, load_qat_checkpoint, load_quantized
from lightning_qat.exceptions import CheckpointError, NotAQATCheckpointError
from lightning_qat.lightning import checkpoint as checkpoint_io
from lightning_qat.lightning.checkpoint import MARKER
from lightning_qat.quantization import ao

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, digits8, float_tiny):
    """A QAT fit that keeps its best checkpoint by val_acc; observers still moving at the best epoch."""
    tmp_path = tmp_path_factory.mktemp("qat_run")
    pl.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max", save_top_k=1)
    qat = QATCallback(freeze_bn_after=1, freeze_observers_after=3, latency_repeats=2, weights="best")
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=3, callbacks=[qat, checkpoint], enable_checkpointing=True)
        | {"default_root_dir": tmp_path, "logger": False}
    )
    trainer.fit(pretrained_tiny(float_tiny), datamodule=digits8)
    return {"qat": qat, "best": checkpoint.best_model_path, "score": float(checkpoint.best_model_score)}


def _run_script(tmp_path, code: str) -> dict:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


STAGES = """
import json, sys
import lightning.pytorch as pl
import torch
from conftest import BoringClassifier, trainer_kwargs
from lightning_qat import QATCallback, load_qat_checkpoint
from lightning_qat.app.data import DigitsDataModule

best = {best!r}
dm = DigitsDataModule(image_size=8, channels=1, batch_size=64)
trainer = pl.Trainer(**trainer_kwargs(".", callbacks=[QATCallback()]))
out = {{"validate": trainer.validate(BoringClassifier(), datamodule=dm, ckpt_path=best, verbose=False)[0]["val_acc"]}}
out["test"] = trainer.test(BoringClassifier(), datamodule=dm, ckpt_path=best, verbose=False)[0]["test_acc"]
predictions = trainer.predict(BoringClassifier(), datamodule=dm, ckpt_path=best)
out["predict_rows"] = sum(len(p) for p in predictions)
try:
    BoringClassifier.load_from_checkpoint(best)
except RuntimeError as err:
    out["plain_error"] = str(err)
helper = load_qat_checkpoint(BoringClassifier, best)
out["helper_fake_quant"] = type(helper.net).__name__
out["helper_validate"] = trainer.validate(helper, datamodule=dm, verbose=False)[0]["val_acc"]
json.dump(out, open(sys.argv[1], "w"))
"""


def test_every_stage_reproduces_the_checkpoint_in_a_fresh_process(tmp_path, qat_run):
    out = _run_script(tmp_path, STAGES.format(best=qat_run["best"]))
    assert out["validate"] == pytest.approx(qat_run["score"], abs=1e-6)  # the val_acc logged when it was saved
    assert out["helper_validate"] == pytest.approx(qat_run["score"], abs=1e-6)
    assert 0.8 < out["test"] <= 1
    assert out["predict_rows"] == 270  # the test split, through DigitsDataModule.predict_dataloader
    assert MARKER in out["plain_error"]  # without lightning-qat: the error says how to load it
    assert "load_qat_checkpoint" in out["plain_error"]
    assert out["helper_fake_quant"] == "GraphModule"


def test_predict_never_moves_quantization_state(tmp_path, digits8, float_tiny):
    pl.seed_everything(0)
    model = pretrained_tiny(float_tiny)
    qat = QATCallback(freeze_bn_after=None, freeze_observers_after=None, evaluate=None, export=[])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[qat]))
    trainer.fit(model, datamodule=digits8)
    assert all(bool(fq.observer_enabled[0]) for _, fq in ao.fake_quant_modules(model.net))  # never frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = torch.cat(trainer.predict(model, datamodule=digits8))
    second = torch.cat(trainer.predict(model, datamodule=digits8))
    assert torch.equal(first, second)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_convert_best_matches_converting_that_checkpoint_by_hand(tmp_path, qat_run, digits8):
    qat = qat_run["qat"]
    assert qat.report.converted_from == f"best: {qat_run['best']}"
    report = convert_checkpoint(BoringClassifier(), qat_run["best"], datamodule=digits8, save_dir=str(tmp_path))
    assert report.metrics["int8"] == qat.report.metrics["int8"]
    assert report.metrics["qat"]["val_acc"] == pytest.approx(qat_run["score"], abs=1e-6)
    assert report.metrics["float"] == qat.report.metrics["float"]  # the float row travels with the checkpoint
    assert report.converted_from == f"checkpoint: {qat_run['best']}"
    x, _ = digits8.splits["val"].tensors
    with torch.no_grad(), ao.quiet():
        assert torch.equal(load_quantized(tmp_path / "model_int8.pt")(x), load_quantized(qat.artifact_path)(x))


def test_converting_a_float_checkpoint_is_a_clear_error(tmp_path, digits8):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=1))
    trainer.fit(BoringClassifier(), datamodule=digits8)
    trainer.save_checkpoint(tmp_path / "float.ckpt")
    with pytest.raises(NotAQATCheckpointError, match="holds no QATCallback state"):
        convert_checkpoint(BoringClassifier(), tmp_path / "float.ckpt", datamodule=digits8)
    with pytest.raises(NotAQATCheckpointError, match=r"BoringClassifier\.load_from_checkpoint"):
        load_qat_checkpoint(BoringClassifier, tmp_path / "float.ckpt")
    # the callback leaves a float checkpoint float
    qat = QATCallback()
    metrics = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[qat])).validate(
        BoringClassifier(), datamodule=digits8, ckpt_path=tmp_path / "float.ckpt", verbose=False
    )
    assert qat.prepared is None
    assert 0 < metrics[0]["val_acc"] <= 1


def test_the_float_row_survives_a_resume(tmp_path, digits8, float_tiny):
    def fit(max_epochs, ckpt_path=None):
        pl.seed_everything(0)
        qat = QATCallback(freeze_bn_after=1, freeze_observers_after=2, export=[], latency_repeats=1)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        # the resumed fit starts from a *fresh* network: its float row must come from the checkpoint
        model = pretrained_tiny(float_tiny) if ckpt_path is None else BoringClassifier()
        trainer = pl.Trainer(
            **trainer_kwargs(tmp_path, max_epochs=max_epochs, callbacks=[qat, checkpoint], enable_checkpointing=True)
        )
        trainer.fit(model, datamodule=digits8, ckpt_path=ckpt_path)
        return qat.report

    original = fit(1)
    resumed = fit(2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.metrics["float"] == original.metrics["float"]
    assert resumed.metrics["float"]["val_acc"] > 0.8  # the pretrained network, not a fresh initialisation


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint", "empty"])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path, qat_run, digits8, damage):
    data = Path(qat_run["best"]).read_bytes()
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes({"truncated": data[: len(data) // 2], "not a checkpoint": b"hello" * 100, "empty": b""}[damage])
    named = r"damaged\.ckpt' \(\d+ bytes\) is not a readable checkpoint"
    with pytest.raises(CheckpointError, match=named):
        load_qat_checkpoint(BoringClassifier, damaged)
    with pytest.raises(CheckpointError, match=named):
        convert_checkpoint(BoringClassifier(), damaged, datamodule=digits8, save_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model_int8.pt").exists()


def test_mark_and_network_state_keep_the_module_versions():
    # without them torch's and torchao's observers load as version 1 and reset their eps
    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(2, 2))

    state = Outer().state_dict()
    marked = checkpoint_io.mark(state)
    assert marked._metadata is state._metadata
    below = checkpoint_io.network_state(marked, "net")
    assert set(below._metadata) == {"", "0"}
    assert below._metadata["0"] == state._metadata["net.0"]
