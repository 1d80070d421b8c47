import json
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import (
    OUTLIER_BUDGET,
    BoringClassifier,
    UntraceableNet,
    pretrained_tiny,
    trainer_kwargs,
    with_outlier_channels,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qat import QATCallback, convert_checkpoint, load_quantized
from lightning_qat.export import aoti
from lightning_qat.lightning import budget
from lightning_qat.quantization import ao, pt2e


def fit_with_budget(tmp_path, digits8, model, max_epochs=2, extra_callbacks=(), **qat_kwargs):
    qat_kwargs = {"max_metric_drop": OUTLIER_BUDGET} | qat_kwargs
    qat = QATCallback(monitor="val_acc", on_drop="fallback", save_dir=str(tmp_path), **qat_kwargs)
    kwargs = trainer_kwargs(tmp_path, max_epochs=max_epochs, callbacks=[qat, *extra_callbacks])
    trainer = pl.Trainer(**kwargs | {"enable_checkpointing": bool(extra_callbacks)})
    trainer.fit(model, datamodule=digits8)
    return qat


def frozen(model):
    """QAT that trains nothing but BatchNorm statistics (lr 0): what adapts to a damaged quantizer is isolated."""
    model.lr = 0.0
    return model


def test_a_missed_budget_keeps_the_damaged_layer_float_and_only_what_it_takes_along(tmp_path, float_tiny, digits8):
    model = frozen(with_outlier_channels(pretrained_tiny(float_tiny)))
    qat = fit_with_budget(tmp_path, digits8, model, fallback_at="end", freeze_bn_after=0)
    report = qat.report
    assert report.fallback_met is True
    assert report.fallback == ["conv1", "conv2"]  # conv2 reads conv1's output quantizer: float with it
    ranked = len(report.layer_sqnr)  # conv1, conv2, fc1, fc2: one group each
    assert report.fallback_evaluations == len(report.fallback_candidates) <= math.ceil(math.log2(ranked)) + 3
    assert report.metrics["float"]["val_acc"] - report.metrics["int8"]["val_acc"] <= OUTLIER_BUDGET
    assert report.metrics["qat"]["val_acc"] < report.metrics["float"]["val_acc"] - 2 * OUTLIER_BUDGET  # real damage
    assert min(report.layer_sqnr, key=report.layer_sqnr.get) == "conv1"  # the ranking the search started from
    # the artifact is the chosen model, and the report files say what was searched
    x = digits8.splits["val"].tensors[0][:64]
    with torch.no_grad(), ao.quiet():
        assert torch.equal(load_quantized(qat.artifact_path)(x), qat.quantized_model(x))
    saved = json.loads((tmp_path / "qat_report.json").read_text())
    assert saved["fallback"] == ["conv1", "conv2"]
    assert saved["fallback_candidates"][-1]["layers"] == ["conv1"]
    markdown = (tmp_path / "qat_report.md").read_text()
    assert "## Fallback candidates" in markdown
    assert "accuracy budget met by keeping float: conv1, conv2" in markdown
    assert (tmp_path / "qat_layers.png").stat().st_size > 10_000


def test_searching_before_qat_adapts_beats_searching_at_the_end(tmp_path, float_tiny, digits8, monkeypatch):
    """QAT adapts to a damaged quantizer (here BatchNorm statistics, over the first half of the run): at the end,
    keeping the layer float no longer brings the accuracy back. The calibrated int8 copy misses the budget by more
    than QAT trains back, so it is searched at the fit's start; QAT trains the result float from its first step.
    A 200x outlier: at the end every candidate is 40+ points short of the budget, at the start conv1 meets it by 5+."""

    def damaged():
        return frozen(with_outlier_channels(pretrained_tiny(float_tiny), factor=200.0))

    said = []
    monkeypatch.setattr(budget, "rank_zero_info", said.append)
    at_end = fit_with_budget(tmp_path / "end", digits8, damaged(), fallback_at="end").report
    # QAT trained BatchNorm around the damage: even every layer float misses, so nothing is searched, and it says so
    (line,) = [line for line in said if "its weights in float too" in line]
    assert "(not searched)" in line
    assert at_end.fallback_candidates == []
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    during = fit_with_budget(
        tmp_path / "during", digits8, damaged(), fallback_at=1, interval="step", extra_callbacks=[checkpoints]
    )
    assert at_end.fallback_met is False
    assert during.report.fallback_met is True
    assert during.report.fallback_candidates[0]["when"] == "fit start"
    assert all(candidate["when"] == "fit start" for candidate in during.report.fallback_candidates)  # met: no more
    assert during.report.fallback == ["conv1", "conv2"]
    assert during.report.metrics["int8"]["val_acc"] >= at_end.metrics["int8"]["val_acc"] + 2 * OUTLIER_BUDGET
    assert during.report.metrics["float"]["val_acc"] - during.report.metrics["int8"]["val_acc"] <= OUTLIER_BUDGET

    # the checkpoint carries the layers kept float: a conversion in a new process keeps them so
    converted = convert_checkpoint(
        frozen(BoringClassifier()), checkpoints.last_model_path, datamodule=digits8, save_dir=str(tmp_path / "conv")
    )
    assert converted.fallback == during.report.fallback
    assert converted.metrics["int8"]["val_acc"] == during.report.metrics["int8"]["val_acc"]


def test_a_met_budget_costs_no_search(tmp_path, float_tiny, digits8):
    qat = fit_with_budget(tmp_path, digits8, pretrained_tiny(float_tiny), max_epochs=1)
    report = qat.report
    assert report.fallback_met is None
    assert report.fallback == []
    assert report.fallback_candidates == []
    assert list(report.layer_sqnr) == ["conv1", "conv2", "fc1", "fc2"]
    assert "## Per-layer SQNR" in (tmp_path / "qat_report.md").read_text()
    assert not qat.budget.searched or qat.budget.fallback == []


def test_eager_networks_say_why_they_are_not_searched(tmp_path, float_tiny, digits8):
    net = UntraceableNet()
    net.load_state_dict(float_tiny["state_dict"])
    model = frozen(with_outlier_channels(BoringClassifier(net)))
    with pytest.warns(UserWarning, match=r"eager mode.*FX-traceable, or skip="):
        qat = fit_with_budget(tmp_path, digits8, model, fallback_at="end", freeze_bn_after=0)
    assert qat.report.fallback_met is None
    assert qat.report.layer_sqnr  # the per-layer SQNR to choose skip= from


def test_dynamic_activations_keep_the_damaged_linear_float_alone(tmp_path, float_tiny, digits8):
    """Dynamic int8 has no activation quantizer to share: the group is the layer. fc1's weight rows each get one
    entry a thousand times larger (its input channel a thousand times smaller): per-row int8 flattens the rest."""
    model = frozen(pretrained_tiny(float_tiny))
    with torch.no_grad():
        model.net.bn2.weight[0] /= 1000
        model.net.bn2.bias[0] /= 1000
        model.net.fc1.weight[:, 0] *= 1000
    qat = fit_with_budget(tmp_path, digits8, model, fallback_at="end", freeze_bn_after=0, activations="dynamic")
    report = qat.report
    assert report.activations == "dynamic"
    assert report.fallback_met is True
    assert report.fallback == ["fc1"]
    assert not isinstance(qat.quantized_model.get_submodule("fc1"), torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(qat.quantized_model.get_submodule("fc2"), torch.ao.nn.quantized.dynamic.Linear)


@pytest.mark.skipif(pt2e.missing() is not None, reason=f"PT2E engine: {pt2e.missing()}")
def test_the_pt2e_engine_meets_a_missed_budget_the_same_way(tmp_path, float_tiny, digits8, monkeypatch):
    """On torchao's captured graph: searched at the fit's start, trained on with the result float, checkpointed,
    converted again from the checkpoint; a .pt2 of the chosen model.

    A 400x outlier: torchao's x86 activations use all 256 levels (FX's x86 ones 128), so 100x costs only 3 points."""
    model = frozen(with_outlier_channels(pretrained_tiny(float_tiny), factor=400.0))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    said = []
    monkeypatch.setattr(budget, "rank_zero_info", said.append)
    qat = fit_with_budget(
        tmp_path, digits8, model, fallback_at=1, interval="step", extra_callbacks=[checkpoints], engine="pt2e"
    )
    report = qat.report
    assert report.mode == "pt2e"
    assert report.fallback_met is True
    assert report.fallback_candidates[0]["when"] == "fit start"
    assert report.fallback == ["conv1", "bn1", "relu1", "conv2"]  # captured, BatchNorm and ReLU are ops of their own
    kept = "conv1, bn1, relu1, conv2"  # what the search chose, what trains and what converts: in the same words
    assert said[1].endswith(f"evaluations; kept float: {kept}."), said
    assert said[2] == f"QAT: training goes on with {kept} kept float."
    assert report.metrics["float"]["val_acc"] - report.metrics["int8"]["val_acc"] <= OUTLIER_BUDGET
    x = digits8.splits["val"].tensors[0][:64]
    assert qat.artifact_path.suffix == ".pt2"
    with torch.no_grad():
        assert aoti.output_error(load_quantized(qat.artifact_path), qat.quantized_model, (x,)) < 0.05
    assert json.loads((tmp_path / "qat_report.json").read_text())["fallback"] == report.fallback
    converted = convert_checkpoint(
        frozen(BoringClassifier()), checkpoints.last_model_path, datamodule=digits8, save_dir=str(tmp_path / "conv")
    )
    assert converted.fallback == report.fallback
    assert converted.metrics["int8"]["val_acc"] == report.metrics["int8"]["val_acc"]
