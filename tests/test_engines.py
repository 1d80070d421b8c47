"""The callback on its two engines: torch.ao FX (the default) and torchao PT2E (``engine="pt2e"``), same digits run."""

import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from conftest import BoringClassifier, UntraceableNet, pretrained_tiny, subprocess_env, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qat import QATCallback, convert_checkpoint, load_quantized
from lightning_qat.quantization import ao, pt2e

needs_pt2e = pytest.mark.skipif(pt2e.missing() is not None, reason=f"PT2E engine: {pt2e.missing()}")


def fit(model, digits8, tmp_path, mode, epochs=2, **qat_kwargs):
    qat = QATCallback(
        engine=mode, freeze_bn_after=1, freeze_observers_after=1, save_dir=str(tmp_path / mode), **qat_kwargs
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs, callbacks=[qat]))
    trainer.fit(model, datamodule=digits8)
    return qat, trainer


@pytest.fixture(scope="module")
def both(float_tiny, digits8, tmp_path_factory):
    """The same float start fine-tuned with QAT on each engine: the callbacks and LightningModules."""
    runs = {}
    for mode in ("fx", "pt2e"):
        if mode == "pt2e" and pt2e.missing():
            continue
        pl.seed_everything(0)
        model = pretrained_tiny(float_tiny)
        qat, _ = fit(model, digits8, tmp_path_factory.mktemp(mode), mode, monitor="val_acc", ptq_baseline=True)
        runs[mode] = (qat, model)
    return runs


@needs_pt2e
def test_pt2e_trains_converts_and_ships_a_compiled_int8_package(both):
    qat, model = both["pt2e"]
    report = qat.report
    assert report.mode == "pt2e"
    assert report.num_fused == 2
    assert report.quantized_layers == 4
    assert report.int8_kernels == 4  # every int8 layer is a oneDNN int8 kernel in the package
    assert qat.artifact_path.name == "model_int8.pt2"
    assert report.latency_runtime["int8"] == "AOTInductor package"
    assert report.size_bytes["int8"] == qat.artifact_path.stat().st_size
    for row in ("float", "ptq", "qat", "int8"):
        assert report.metrics[row]["val_acc"] > 0.85, row
    assert abs(report.metrics["int8"]["val_acc"] - report.metrics["qat"]["val_acc"]) < 0.02


@needs_pt2e
def test_both_engines_reach_the_same_digits_accuracy(both):
    fx, ptq = both["fx"][0].report.metrics["int8"]["val_acc"], both["pt2e"][0].report.metrics["int8"]["val_acc"]
    assert abs(fx - ptq) < 0.03, (fx, ptq)


@needs_pt2e
def test_the_package_runs_without_torchao_at_batch_1_and_the_validation_batch(both, digits8, tmp_path):
    qat, _ = both["pt2e"]
    assert qat.report.package_shapes == "[[any, 1, 8, 8]]"  # compiled from an example batch of 64
    x = digits8.splits["val"].tensors[0]
    package = load_quantized(qat.artifact_path)
    for rows in (1, len(x)):
        torch.save(x[:rows], tmp_path / f"x{rows}.pt")
        torch.save(package(x[:rows]), tmp_path / f"expected{rows}.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['torchao'] = None  # any import of torchao fails\n"
        f"m = torch._inductor.aoti_load_package({str(qat.artifact_path)!r})\n"
        f"for rows in (1, {len(x)}):\n"
        f"    x = torch.load(f'{tmp_path}/x{{rows}}.pt')\n"
        f"    torch.testing.assert_close(m(x), torch.load(f'{tmp_path}/expected{{rows}}.pt'))\n"
        "assert not any(name.startswith('lightning_qat') for name in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env())
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    want = qat.quantized_model(x)  # and the package computes what its int8 graph computes, at the validation batch
    assert ((torch.load(tmp_path / f"expected{len(x)}.pt") - want).norm() / want.norm()).item() < 0.05


@needs_pt2e
def test_the_package_refuses_another_image_size_naming_both(both, digits8):
    package = load_quantized(both["pt2e"][0].artifact_path)
    with pytest.raises(ValueError, match=r"shapes \[\[any, 1, 8, 8\]\] and got \[\[7, 1, 9, 9\]\]"):
        package(torch.zeros(7, 1, 9, 9))


@needs_pt2e
def test_validation_leaves_no_trace_in_the_observers(both, digits8, tmp_path):
    qat, model = both["pt2e"]
    network = qat.network(model)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[qat])).validate(model, datamodule=digits8, verbose=False)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    assert all(not bool(fq.observer_enabled[0]) for _, fq in ao.fake_quant_modules(network))  # frozen at epoch 1


@needs_pt2e
def test_pt2e_resumes_from_a_checkpoint(float_tiny, digits8, tmp_path):
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs = dict(freeze_bn_after=1, freeze_observers_after=1, export=[], evaluate=None)
    first = QATCallback(engine="pt2e", **kwargs)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[first, ckpt], enable_checkpointing=True))
    trainer.fit(pretrained_tiny(float_tiny), datamodule=digits8)
    trained = {k: v.clone() for k, v in first.network(trainer.lightning_module).state_dict().items()}
    resumed, model = QATCallback(engine="pt2e", **kwargs), pretrained_tiny(float_tiny)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[resumed]))
    trainer.fit(model, datamodule=digits8, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))  # nothing left to train
    for key, value in resumed.network(model).state_dict().items():
        torch.testing.assert_close(value, trained[key], msg=lambda m, key=key: f"{key}: {m}")
    assert resumed.report.mode == "pt2e"
    # the checkpoint converts in a new run without training, into the engine's own artifact
    report = convert_checkpoint(
        pretrained_tiny(float_tiny), tmp_path / "ckpt" / "last.ckpt", datamodule=digits8, save_dir=str(tmp_path / "c")
    )
    assert report.mode == "pt2e"
    assert report.artifact == str(tmp_path / "c" / "model_int8.pt2")
    assert report.int8_kernels == report.quantized_layers == 4
    assert report.metrics["int8"]["val_acc"] > 0.85


@needs_pt2e
def test_pt2e_dynamic_activations_train_convert_compile_and_convert_again_from_the_checkpoint(
    float_tiny, digits8, tmp_path
):
    """activations="dynamic": Linears int8 with per-batch activation scales (captured so), convolutions float."""
    pl.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    qat = QATCallback(engine="pt2e", activations="dynamic", monitor="val_acc", save_dir=str(tmp_path / "fit"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[qat, ckpt], enable_checkpointing=True))
    trainer.fit(pretrained_tiny(float_tiny), datamodule=digits8)
    report = qat.report
    assert report.activations == "dynamic"
    assert report.quantized_layers == report.int8_kernels == 2  # fc1, fc2: the compiled package's int8 kernels
    assert report.float_params["conv2d"] == 32 * 9 + 64 * 32 * 9  # the convolutions' weights stay float
    assert report.package_shapes == "[[any, 1, 8, 8]]"
    assert "activations: dynamic int8" in "\n".join(report.summary())
    assert report.metrics["float"]["val_acc"] > 0.9
    assert abs(report.metrics["int8"]["val_acc"] - report.metrics["qat"]["val_acc"]) < 0.01
    again = convert_checkpoint(
        pretrained_tiny(float_tiny), tmp_path / "ckpt" / "last.ckpt", datamodule=digits8, save_dir=str(tmp_path / "c")
    )
    assert again.activations == "dynamic"
    assert again.quantized_layers == 2
    assert again.metrics["int8"]["val_acc"] == pytest.approx(report.metrics["int8"]["val_acc"], abs=0.01)


@needs_pt2e
def test_pt2e_stops_in_setup_with_the_reason(digits8, tmp_path):
    model = BoringClassifier(UntraceableNet())
    qat = QATCallback(engine="pt2e")
    with pytest.raises(RuntimeError, match="torch.export cannot capture UntraceableNet"):
        pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[qat])).fit(model, datamodule=digits8)
    assert qat.prepared is None


@needs_pt2e
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(backend="qnnpack"), r"quantizes for backends \['x86', 'fbgemm'\], not backend='qnnpack'"),
        (
            dict(on_drop="fallback", monitor="val_acc", max_metric_drop=0.01, activations="dynamic"),
            r"on_drop='fallback' with engine='pt2e' and activations='dynamic'.*PT2E with static activations",
        ),
        (dict(export=["torchscript"]), r"cannot write \['torchscript'\]; its formats are \['pt2'\]"),
    ],
)
def test_pt2e_refuses_what_it_does_not_have_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QATCallback(engine="pt2e", **kwargs)


def test_pt2_export_needs_pt2e():
    with pytest.raises(ValueError, match=r"'pt2' package needs engine='pt2e'"):
        QATCallback(export=["pt2"])
