"""Lightning's own callbacks beside QATCallback: pruning in both orders, weight averaging refused, the others train."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import BoringClassifier, pretrained_tiny, trainer_kwargs
from lightning.pytorch import callbacks
from lightning.pytorch.callbacks import ModelPruning

from lightning_qat import PreflightError, QATCallback
from lightning_qat.lightning import peers
from lightning_qat.quantization import ao


def _qat(**kwargs):
    return QATCallback(interval="epoch", freeze_bn_after=1, freeze_observers_after=1, latency_repeats=1, **kwargs)


@pytest.mark.parametrize("order", ["pruning first", "qat first"])
def test_pruning_beside_qat_prunes_the_qat_layers_and_the_int8_weights_keep_the_zeros(
    tmp_path, digits8, float_tiny, order, monkeypatch
):
    """Before: pruning first pruned the float layers nothing called (0% zeros); QAT first failed at the second step
    ("Trying to backward through the graph a second time": the BatchNorm inside a fused Conv-BN never runs its hook)."""
    said = []
    monkeypatch.setattr(peers, "rank_zero_info", said.append)
    pl.seed_everything(0)
    model = pretrained_tiny(float_tiny)
    pruning = ModelPruning("l1_unstructured", amount=lambda epoch: 0.5 if epoch == 0 else 0.0)  # then 1 epoch to heal
    qat = _qat(export=[])
    both = [pruning, qat] if order == "pruning first" else [qat, pruning]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=both))
    trainer.fit(model, datamodule=digits8)

    layers = {n: m for n, m in model.net.named_modules() if n in ("conv1", "conv2", "fc1", "fc2")}
    int8 = dict(qat.quantized_model.named_modules())
    for name, layer in layers.items():
        assert not hasattr(layer, "weight_orig")  # the pruning was made permanent at the end of training
        pruned = layer.weight == 0
        assert pruned.any(), name
        assert (ao.int8_weight(int8[name])[pruned] == 0).all(), name  # every pruned weight is an int8 zero
    assert not any((ao.fused_batch_norm(m).weight == 0).any() for m in layers.values() if ao.is_conv_bn_qat(m))
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values()) / sum(m.weight.numel() for m in layers.values())
    assert zeros >= 0.45  # half of the layers' weights and biases, globally by magnitude
    assert qat.report.zero_weights >= zeros
    assert qat.report.metrics["int8"]["val_acc"] >= float_tiny["val_acc"] - 0.1  # pruned, then one epoch of QAT
    # timm's mobilenetv2_100 listed all 104 names of its fused BatchNorms' parameters here
    line = next(line for line in said if " does not prune " in line)
    assert line.startswith("QAT: ModelPruning does not prune 4 parameters (net.")
    assert line.count("net.") == 3
    assert ", ...): BatchNorms fused" in line
    print(f"{order}: {zeros:.1%} zero, int8 val_acc {qat.report.metrics['int8']['val_acc']:.4f}")


AVERAGING = ["StochasticWeightAveraging", "WeightAveraging"]


@pytest.mark.parametrize("name", AVERAGING)
def test_weight_averaging_beside_qat_is_refused_in_setup(tmp_path, digits8, name):
    if not hasattr(callbacks, name):
        pytest.skip(f"Lightning {pl.__version__} has no {name}")
    swa = name == "StochasticWeightAveraging"
    averaging = callbacks.StochasticWeightAveraging(swa_lrs=0.01) if swa else callbacks.WeightAveraging()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[averaging, _qat(export=[])]))
    with pytest.raises(PreflightError, match=f"{name} beside QATCallback.*before QAT"):
        trainer.fit(BoringClassifier(), datamodule=digits8)
    assert trainer.global_step == 0


class WithBackbone(BoringClassifier):
    """BackboneFinetuning reads ``pl_module.backbone``: here the network QAT prepares."""

    def __init__(self, net):
        super().__init__(net)
        self.backbone = self.net


OTHERS = {
    "BackboneFinetuning": lambda: callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1),
    "GradientAccumulationScheduler": lambda: callbacks.GradientAccumulationScheduler({0: 2}),
    "LearningRateFinder": lambda: callbacks.LearningRateFinder(num_training_steps=10, update_attr=False),
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_other_callbacks_that_read_the_modules_train_beside_qat(tmp_path, digits8, float_tiny, name):
    pl.seed_everything(0)
    model = pretrained_tiny(float_tiny)
    if name == "BackboneFinetuning":
        model = WithBackbone(model.net)
    qat = _qat(export=[], module="net")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[OTHERS[name](), qat]))
    trainer.fit(model, datamodule=digits8)
    metrics = qat.report.metrics
    assert abs(metrics["int8"]["val_acc"] - metrics["qat"]["val_acc"]) <= 0.05  # int8 of what QAT trained
    assert metrics["int8"]["val_acc"] >= 0.8
    with torch.no_grad():
        assert qat.quantized_model(digits8.splits["val"].tensors[0][:4]).shape == (4, 10)
