"""The phone engine: ``backend="xnnpack"`` trains with ExecuTorch's XNNPACK quantizer and ships a ``.pte`` program."""

import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from conftest import pretrained_tiny, subprocess_env, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qat import QATCallback, convert_checkpoint, load_quantized
from lightning_qat.exceptions import PT2EUnavailable
from lightning_qat.quantization import xnnpack
from lightning_qat.quantization.convert import cpu_eval_copy, freeze_for_inference

needs_executorch = pytest.mark.skipif(xnnpack.missing() is not None, reason=f"XNNPACK engine: {xnnpack.missing()}")


@pytest.fixture(scope="module")
def phone(float_tiny, digits8, tmp_path_factory):
    """The tiny float network fine-tuned for a phone: the callback, the LightningModule and the checkpoint folder."""
    pl.seed_everything(0)
    tmp = tmp_path_factory.mktemp("xnnpack")
    qat = QATCallback(
        backend="xnnpack", freeze_bn_after=1, freeze_observers_after=1, monitor="val_acc", save_dir=str(tmp / "fit")
    )
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)
    model = pretrained_tiny(float_tiny)
    trainer = pl.Trainer(**trainer_kwargs(tmp, max_epochs=2, callbacks=[qat, ckpt], enable_checkpointing=True))
    trainer.fit(model, datamodule=digits8)
    return qat, model, tmp


@needs_executorch
def test_xnnpack_trains_and_ships_a_pte_evaluated_and_timed_in_executorch(phone):
    qat, _, _ = phone
    report = qat.report
    assert report.mode == "xnnpack"  # engine="auto" takes the only engine of the backend
    assert qat.artifact_path.name == "model_int8.pte"
    assert report.latency_runtime["int8"] == "ExecuTorch runtime (XNNPACK delegate)"
    assert report.size_bytes["int8"] == qat.artifact_path.stat().st_size
    assert report.size_bytes["float"] / report.size_bytes["int8"] > 2.5
    assert report.quantized_layers == 4
    # every operator with arithmetic runs in the delegate; the reshapes around the flatten outside it
    assert report.delegated["xnnpack"] > 0
    assert set(report.delegated) <= {"xnnpack", "layout"}, report.delegated
    assert "XNNPACK delegate: " in "\n".join(report.summary())
    assert report.package_shapes == "[[any, 1, 8, 8]] (batch up to 64)"  # the example's batch of 64
    for row in ("float", "qat", "int8"):
        assert report.metrics[row]["val_acc"] > 0.85, row
    assert abs(report.metrics["int8"]["val_acc"] - report.metrics["qat"]["val_acc"]) < 0.02


@needs_executorch
def test_the_pte_agrees_with_the_qat_network_on_99_percent_of_digits(phone, digits8):
    qat, model, _ = phone
    x = digits8.splits["val"].tensors[0]
    network = cpu_eval_copy(qat.network(model))
    freeze_for_inference(network)
    with torch.no_grad():
        agreement = (load_quantized(qat.artifact_path)(x).argmax(1) == network(x).argmax(1)).float().mean().item()
    assert agreement >= 0.99, agreement


@needs_executorch
def test_the_report_s_int8_row_is_the_pte_in_executorch_not_the_graph_it_came_from(phone, digits8):
    qat, _, _ = phone
    x, y = digits8.splits["val"].tensors
    with torch.no_grad():
        shipped = torch.nn.functional.cross_entropy(load_quantized(qat.artifact_path)(x), y).item()
        graph = torch.nn.functional.cross_entropy(qat.quantized_model(x), y).item()
    assert shipped != graph  # XNNPACK's integer requantization rounds otherwise than torch's reference graph
    assert qat.report.metrics["int8"]["val_loss"] == pytest.approx(shipped, rel=1e-5)


@needs_executorch
def test_the_pte_runs_in_executorch_alone_at_batch_1_and_the_validation_batch(phone, digits8, tmp_path):
    qat, _, _ = phone
    x = digits8.splits["val"].tensors[0][:64]
    program = load_quantized(qat.artifact_path)
    for rows in (1, len(x)):
        torch.save(x[:rows], tmp_path / f"x{rows}.pt")
        torch.save(program(x[:rows]), tmp_path / f"expected{rows}.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['torchao'] = None  # any import of torchao fails\n"
        "from executorch.runtime import Runtime\n"
        f"method = Runtime.get().load_program({str(qat.artifact_path)!r}).load_method('forward')\n"
        f"for rows in (1, {len(x)}):\n"
        f"    out = method.execute([torch.load(f'{tmp_path}/x{{rows}}.pt')])[0]\n"
        f"    torch.testing.assert_close(out, torch.load(f'{tmp_path}/expected{{rows}}.pt'))\n"
        "assert not any(name.startswith('lightning_qat') for name in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env())
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@needs_executorch
def test_the_pte_runs_larger_batches_in_chunks_and_refuses_another_image_size(phone, digits8):
    qat, _, _ = phone
    program = load_quantized(qat.artifact_path)
    x = digits8.splits["val"].tensors[0]  # 270 images: 64 at most per call
    with torch.no_grad():
        whole = program(x)
        one_by_one = torch.cat([program(x[i : i + 1]) for i in range(0, len(x), 50)])
    torch.testing.assert_close(whole[::50], one_by_one)
    with pytest.raises(ValueError, match=r"takes inputs of shapes \[\[any, 1, 8, 8\]\].*got \[\[7, 1, 9, 9\]\]"):
        program(torch.zeros(7, 1, 9, 9))


@needs_executorch
def test_xnnpack_resumes_and_converts_from_its_checkpoint(phone, float_tiny, digits8):
    qat, model, tmp = phone
    resumed, again = QATCallback(backend="xnnpack", export=[], evaluate=None), pretrained_tiny(float_tiny)
    trainer = pl.Trainer(**trainer_kwargs(tmp, max_epochs=2, callbacks=[resumed]))
    trainer.fit(again, datamodule=digits8, ckpt_path=str(tmp / "ckpt" / "last.ckpt"))  # nothing left to train
    for key, value in resumed.network(again).state_dict().items():
        torch.testing.assert_close(value, qat.network(model).state_dict()[key], msg=key)
    report = convert_checkpoint(
        pretrained_tiny(float_tiny), tmp / "ckpt" / "last.ckpt", datamodule=digits8, save_dir=str(tmp / "c")
    )
    assert report.mode == "xnnpack"
    assert report.artifact == str(tmp / "c" / "model_int8.pte")
    assert report.metrics["int8"]["val_acc"] == pytest.approx(qat.report.metrics["int8"]["val_acc"], abs=0.01)


@needs_executorch
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(engine="fx"), r"engine='fx' quantizes for backends \['x86', 'fbgemm', 'qnnpack'\], not "),
        (dict(engine="pt2e"), r"engine='pt2e' quantizes for backends \['x86', 'fbgemm'\].*use engine='xnnpack'"),
        (dict(export=["torchscript"]), r"cannot write \['torchscript'\]; its formats are \['pte'\]"),
        (dict(activations="dynamic"), r"activations='dynamic' is an artifact of engines"),
        (
            dict(on_drop="fallback", monitor="val_acc", max_metric_drop=0.01),
            r"on_drop='fallback' with engine='xnnpack'.*XNNPACK not yet",
        ),
    ],
)
def test_xnnpack_refuses_what_it_does_not_have_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QATCallback(backend="xnnpack", **kwargs)


def test_xnnpack_without_executorch_names_the_extra(monkeypatch):
    monkeypatch.setattr(xnnpack, "missing", lambda: f"ExecuTorch is not installed: {xnnpack.INSTALL_HINT}")
    with pytest.raises(PT2EUnavailable, match=r"backend='xnnpack' cannot run.*lightning-qat\[mobile\]"):
        QATCallback(backend="xnnpack")


def test_qnnpack_by_name_points_phones_to_xnnpack():
    with pytest.warns(UserWarning, match="For a phone, use backend='xnnpack'"):
        QATCallback(backend="qnnpack")


@needs_executorch
def test_a_network_that_fixes_its_batch_gets_a_program_of_the_example_shape(digits8, tmp_path):
    """Where torch.export cannot make the batch dynamic, the .pte takes the example's shape and refuses others."""

    class FixedBatch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(4 * 64, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).reshape(16, 4 * 64))  # the batch is 16, written in the code

    from lightning_qat.export.pte import save_pte
    from lightning_qat.quantization.convert import to_int8
    from lightning_qat.quantization.prepare import prepare_model

    x = digits8.splits["val"].tensors[0][:16]
    prepared = prepare_model(FixedBatch(), "xnnpack", "auto", [], (x,))
    prepared.module(x)
    quantized = to_int8(prepared.module, prepared.engine, "xnnpack", (x,))
    program = save_pte(quantized, tmp_path / "fixed.pte", (x,))
    assert program.max_batch == 0
    assert program.shapes == [[16, 1, 8, 8]]
    assert "fixed the batch size" in program.static or "cannot lower" in program.static, program.static
    loaded = load_quantized(program.path)
    torch.testing.assert_close(loaded(x), quantized(x), atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match=r"takes inputs of shapes \[\[16, 1, 8, 8\]\] and got \[\[8, 1, 8, 8\]\]"):
        loaded(x[:8])


@needs_executorch
def test_skip_keeps_a_layer_float_under_the_xnnpack_quantizer(digits8):
    from conftest import TinyNet

    from lightning_qat.quantization import pt2e
    from lightning_qat.quantization.convert import to_int8
    from lightning_qat.quantization.prepare import prepare_model

    x = digits8.splits["val"].tensors[0][:16]
    prepared = prepare_model(TinyNet(), "xnnpack", "auto", ["fc2"], (x,))
    prepared.module(x)
    quantized = to_int8(prepared.module.eval(), prepared.engine, "xnnpack", (x,))
    assert pt2e.int8_layers(quantized) == 3  # conv1, conv2, fc1
    assert pt2e.float_parameters(quantized) == {"linear": 256 * 10}  # fc2's weight


@needs_executorch
def test_a_bias_the_int32_grid_cannot_hold_runs_float_in_the_pte(digits8, tmp_path):
    """XNNPACK, like ONNX Runtime, adds an int8 conv's bias as an int32 on the grid of input x weight scale; a channel
    whose input never opened (``DeadChannel``, a folded weight scale of tens) had its bias missed by many output steps,
    and the program computed 12% away from the int8 graph. That layer now runs in float inside the delegate."""
    from conftest import DeadChannel

    from lightning_qat.export.pte import load_pte, save_pte
    from lightning_qat.quantization.convert import to_int8
    from lightning_qat.quantization.prepare import prepare_model

    torch.manual_seed(0)
    x = digits8.splits["val"].tensors[0]
    prepared = prepare_model(DeadChannel(), "xnnpack", "auto", [], (x[:2],))
    with torch.no_grad():
        for batch in x[:256].split(64):
            prepared.module(batch)
    quantized = to_int8(prepared.module.eval(), prepared.engine, "xnnpack", (x[:2],))
    program = save_pte(quantized, tmp_path / "dead.pte", (x[:8],))
    assert program.float_bias == ["depthwise.0"]  # the one layer, no other
    assert not program.outside  # the float layer still runs inside the XNNPACK delegate
    with torch.no_grad():
        expected, out = quantized(x[:256]), load_pte(program.path)(x[:256])
    assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.99
    assert (out - expected).abs().mean() <= 0.01 * expected.abs().mean()
