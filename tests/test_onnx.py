import importlib.util
import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import onnx
import pytest
import torch
from conftest import (
    BoringClassifier,
    IdsFromPixels,
    UntraceableNet,
    one_signed_qat,
    pretrained_tiny,
    trainer_kwargs,
)
from torch import nn

from lightning_qat import QATCallback, load_quantized
from lightning_qat.exceptions import OnnxExtraMissing, PreflightError
from lightning_qat.export.onnx import OnnxRuntimeNetwork, onnx_bytes, to_export_form
from lightning_qat.export.qdq_graph import Graph
from lightning_qat.quantization import ao
from lightning_qat.quantization.prepare import prepare_model


def _calibrated(float_tiny, digits8, mode, net_cls):
    x, _ = digits8.splits["val"].tensors
    net = pretrained_tiny(float_tiny, net_cls).net
    prepared = prepare_model(net, "x86", mode, [], (x[:2],)).module.train()
    with torch.no_grad(), ao.quiet():
        for batch in x[:512].split(64):
            prepared(batch)
    ao.freeze_bn_stats(prepared)
    ao.set_observers(prepared, False)
    return prepared.eval(), x


@pytest.mark.parametrize(("mode", "net_cls"), [("fx", None), ("eager", UntraceableNet)])
def test_export_form_folds_bn_and_computes_what_the_qat_network_computes(float_tiny, digits8, mode, net_cls):
    from conftest import TinyNet

    prepared, x = _calibrated(float_tiny, digits8, mode, net_cls or TinyNet)
    exported = to_export_form(prepared)
    assert not ao.fake_quant_modules(exported)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in exported.modules())
    assert ao.fake_quant_modules(prepared)  # the QAT network itself is untouched
    with torch.no_grad(), ao.quiet():
        expected, actual = prepared(x), exported(x)
    step = float(dict(ao.fake_quant_modules(prepared))[_last_fake_quant(prepared)].scale)
    # The same grids and clamps: only a rounding tie that the folded weights' float error flips differs, by a step
    # there and rarely by more downstream (measured: 99.9% identical, max 1 step; before activations clamped to 8
    # bits in QAT as in the export, 8 steps where QAT clamped at 127).
    diff = (expected - actual).abs()
    print(f"equal {(diff <= step * 0.01).float().mean():.4f}, max {float(diff.max() / step):.1f} steps")
    assert (diff <= step * 0.01).float().mean() >= 0.99
    assert diff.max() <= 2 * step + 1e-6
    assert (expected.argmax(1) == actual.argmax(1)).float().mean() >= 0.99


def test_weights_are_symmetric_in_the_qdq_graph_in_every_channel(tmp_path, digits8):
    """A depthwise channel of one sign had zero point -128 or 127 in the file: ONNX Runtime took its slow path for the
    layer (mobilenet_v2 at 224 px: 31 ms against 4.5 ms once symmetric) and OpenVINO ran it in float."""
    prepared, x = one_signed_qat(digits8)
    ao.freeze_bn_stats(prepared)
    ao.set_observers(prepared, False)
    model = onnx.load_from_string(onnx_bytes(prepared.eval(), (x[:2],)))
    graph = Graph(model)
    weights = {
        n.name.split("/")[1]: n for n in model.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.name
    }
    assert sorted(weights) == ["depthwise", "expand", "head"]
    zero_points = {name: graph.constant(node.input[2]) for name, node in weights.items()}
    assert zero_points["depthwise"].shape == (8,)  # per channel
    assert all(z.dtype == np.int8 and (z == 0).all() for z in zero_points.values())
    with torch.no_grad(), ao.quiet():
        expected = prepared(x[:256]).argmax(1)
    path = tmp_path / "depthwise.onnx"
    path.write_bytes(model.SerializeToString())
    assert (OnnxRuntimeNetwork(path)(x[:256]).argmax(1) == expected).float().mean() >= 0.99


def _last_fake_quant(network):
    return [name for name, _ in ao.fake_quant_modules(network) if "weight" not in name][-1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits8, float_tiny):
    tmp_path = tmp_path_factory.mktemp("onnx")
    pl.seed_everything(0)
    qat = QATCallback(
        freeze_bn_after=1, freeze_observers_after=1, export=["torchscript", "onnx"], save_dir=str(tmp_path / "out")
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[qat], max_epochs=2))
    trainer.fit(pretrained_tiny(float_tiny), datamodule=digits8)
    return qat


def test_onnx_artifact_agrees_with_the_torchscript_artifact_on_digits(exported, digits8):
    x, _ = digits8.splits["val"].tensors
    with torch.no_grad(), ao.quiet():
        onnx_logits = OnnxRuntimeNetwork(exported.onnx_path)(x)
        ts_logits = load_quantized(exported.artifact_path)(x)
    agreement = (onnx_logits.argmax(1) == ts_logits.argmax(1)).float().mean()
    assert agreement >= 0.99, float(agreement)


def test_onnx_artifact_computes_what_the_qat_network_computes(exported, digits8):
    """ONNX Runtime's int8 kernels on the QAT network's grids: a step of rounding apart at most, never a clamp."""
    x, _ = digits8.splits["val"].tensors
    qat = exported.finished.trained_network
    with torch.no_grad(), ao.quiet():
        onnx_logits, qat_logits = OnnxRuntimeNetwork(exported.onnx_path)(x), qat(x)
    step = float(dict(ao.fake_quant_modules(qat))[_last_fake_quant(qat)].scale)
    diff = (onnx_logits - qat_logits).abs()
    agreement = (onnx_logits.argmax(1) == qat_logits.argmax(1)).float().mean()
    print(f"max {float(diff.max() / step):.1f} steps, argmax {agreement:.4f}")
    assert diff.max() <= 2 * step + 1e-6  # measured 1 step (8 where QAT clamped activations at 127 and ONNX at 255)
    assert agreement >= 0.99


def test_report_has_an_int8_onnx_row_evaluated_and_timed_in_onnx_runtime(exported):
    report = exported.report
    assert report.onnx_artifact == str(exported.onnx_path)
    assert abs(report.metrics["int8-onnx"]["val_acc"] - report.metrics["int8"]["val_acc"]) <= 0.02
    assert report.size_bytes["int8-onnx"] == exported.onnx_path.stat().st_size
    assert report.size_bytes["int8-onnx"] < report.size_bytes["float"] / 2  # int8 weights, not float ones
    assert report.latency_ms["int8-onnx"] > 0
    assert report.latency_runtime["int8-onnx"].startswith("ONNX Runtime ")
    assert report.onnx_speedup == pytest.approx(report.latency_ms["float"] / report.latency_ms["int8-onnx"])
    assert "int8-onnx" in report.to_markdown()


def test_the_onnx_graph_stores_int8_weights_behind_dequantize_nodes(exported):
    graph = onnx.load(str(exported.onnx_path)).graph
    initializers = {init.name: init for init in graph.initializer}
    int8_weights = [
        name
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        for name in node.input[:1]
        if name in initializers and initializers[name].data_type == onnx.TensorProto.INT8
    ]
    assert len(int8_weights) == 4  # conv1, conv2, fc1, fc2
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in initializers]
    assert not [i for i in initializers.values() if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2]


def test_the_onnx_artifact_runs_with_onnxruntime_alone(exported, digits8, tmp_path):
    x, _ = digits8.splits["val"].tensors
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, numpy as np, onnxruntime as ort; "
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
        "assert 'lightning_qat' not in sys.modules and 'torch' not in sys.modules; "
        "np.save(sys.argv[3], s.run(None, {'input': np.load(sys.argv[2])})[0])"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(exported.onnx_path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True,
        cwd=tmp_path,
    )
    with torch.no_grad():
        expected = OnnxRuntimeNetwork(exported.onnx_path)(x)
    assert np.array_equal(np.load(tmp_path / "y.npy"), expected.numpy())


def test_missing_extra_is_named_with_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(OnnxExtraMissing, match=r"needs onnxruntime.*pip install 'lightning-qat\[onnx\]'"):
        QATCallback(export=["torchscript", "onnx"])
    QATCallback(export=["torchscript"])  # the default needs nothing more


@pytest.mark.parametrize("export", ["onnx", ["tflite"], ["onnx", "onnx"]])
def test_export_values_are_checked(export):
    with pytest.raises(ValueError, match=r"export=.*(torchscript|distinct formats)"):
        QATCallback(export=export)


def test_an_empty_export_writes_no_artifact():
    assert QATCallback(export=[]).export == []


def test_a_layer_onnx_cannot_take_fails_in_setup_before_training(tmp_path, digits8):
    model = BoringClassifier(IdsFromPixels())
    qat = QATCallback(export=["torchscript", "onnx"])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, callbacks=[qat], max_epochs=1))
    with pytest.raises(PreflightError, match=r"cannot be exported to ONNX.*Embedding.*Remove 'onnx' from export="):
        trainer.fit(model, datamodule=digits8)
    assert trainer.global_step == 0
