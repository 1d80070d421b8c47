"""QAT on a CUDA device, int8 conversion and evaluation on the CPU. Skipped without CUDA (CI has none)."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import pretrained_tiny, trainer_kwargs

from lightning_qat import QATCallback, load_quantized
from lightning_qat.quantization import ao

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_qat_on_cuda_converts_and_evaluates_on_cpu(tmp_path, digits8, float_tiny):
    pl.seed_everything(0)
    model = pretrained_tiny(float_tiny)
    qat = QATCallback(freeze_bn_after=1, freeze_observers_after=2, monitor="val_acc", latency_repeats=3)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[qat], accelerator="gpu", devices=1))
    trainer.fit(model, datamodule=digits8)

    assert next(model.parameters()).is_cuda  # the trained QAT model stays where it trained
    assert all(p.device.type == "cpu" for p in qat.quantized_model.parameters())
    assert qat.report.metrics["int8"]["val_acc"] >= float_tiny["val_acc"] - 0.02
    x, _ = digits8.splits["val"].tensors
    with torch.no_grad(), ao.quiet():
        assert torch.equal(load_quantized(qat.artifact_path)(x), qat.quantized_model(x))
