"""Dynamic int8 from the QAT weights, and the end of fit choosing it when it is faster."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import BoringClassifier, TinyNet, trainer_kwargs
from torch import nn
from zoo import NormGeluBlock, TorchvisionViT

from lightning_qat import PreflightError, QATCallback, convert_checkpoint, load_quantized
from lightning_qat.lightning import activations
from lightning_qat.quantization import ao, pt2e
from lightning_qat.quantization.dynamic import LINEAR_HEAVY, linear_share, to_dynamic
from lightning_qat.quantization.inputs import shorter
from lightning_qat.quantization.prepare import prepare_model


def _trained_qat(net, x):
    prepared = prepare_model(net, "x86", "fx", [], (x[:2],)).module
    with torch.no_grad():
        for chunk in x.split(64):
            prepared(chunk)
    ao.set_observers(prepared, False)
    return prepared.eval()


def _dynamic_linears(network):
    return [m for m in network.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")]


def test_dynamic_linears_hold_the_weights_qat_trained(digits8):
    x, _ = digits8.splits["train"].tensors
    qat = _trained_qat(TorchvisionViT(), x[:256])
    dynamic = to_dynamic(qat)
    qat_linears = {n: m for n, m in qat.named_modules() if ao.dynamic_linear_type(m)}
    int8_linears = dict(dynamic.named_modules())
    assert len(qat_linears) == 2 * 4 + 1  # per block: in_proj, out_proj, two MLP Linears; the head
    for name, module in qat_linears.items():
        int8 = int8_linears[name]
        assert type(int8).__module__.startswith("torch.ao.nn.quantized.dynamic"), name
        with torch.no_grad():
            trained = module.weight_fake_quant(module.weight)
        assert torch.equal(int8.weight().dequantize(), trained), name
    assert not ao.fake_quant_modules(dynamic)  # activations are quantized per batch, at run time


def test_embeddings_keep_their_int8_weights_in_dynamic_int8(digits8):
    from zoo import TextEncoder, to_padded_ids

    x, _ = digits8.splits["train"].tensors
    ids = to_padded_ids(x[:64])
    prepared = prepare_model(TextEncoder(), "x86", "fx", [], (ids[:2],)).module
    with torch.no_grad():
        prepared(ids)
    dynamic = to_dynamic(prepared.eval())
    assert isinstance(dynamic.get_submodule("embedding"), torch.ao.nn.quantized.Embedding)
    with torch.no_grad():
        assert dynamic(ids).shape == (64, 10)


def test_dynamic_int8_computes_the_qat_weights_on_float_activations(digits8):
    x, _ = digits8.splits["train"].tensors
    qat = _trained_qat(NormGeluBlock(), x[:256])
    dynamic = to_dynamic(qat)
    for name, fake_quant in ao.fake_quant_modules(qat):
        if not name.endswith("weight_fake_quant"):
            fake_quant.disable_fake_quant()  # QAT's weights, float activations: dynamic int8 but its input rounding
    with torch.no_grad():
        expected, out = qat(x), dynamic(x)
    error = ((out - expected).abs().mean() / expected.abs().mean()).item()
    assert error < 0.03, error  # measured 1.7%: the per-batch rounding of each Linear's input


def test_linear_share_tells_transformers_from_cnns(digits8):
    x, _ = digits8.splits["train"].tensors
    vit, cnn = _trained_qat(TorchvisionViT(), x[:64]), _trained_qat(TinyNet(), x[:64])
    assert linear_share(vit, (x[:2],)) > LINEAR_HEAVY
    assert linear_share(cnn, (x[:2],)) < LINEAR_HEAVY  # half its weights are Linear, a tenth of its compute


@pytest.mark.parametrize("faster", ["dynamic", "static"])
def test_auto_keeps_the_faster_activations_and_says_so(tmp_path, digits8, monkeypatch, faster):
    timed = []

    def timing(networks, *args, **kwargs):  # the candidates' speed is machine-dependent: said here
        timed.append(sorted(networks))
        return {name: 1.0 if name == faster else 2.0 for name in networks}

    monkeypatch.setattr(activations, "measure_latency", timing)
    traced, ship = [], activations.shipped
    monkeypatch.setattr(activations, "shipped", lambda *args: traced.append(args[-1].name) or ship(*args))
    pl.seed_everything(0)
    qat = QATCallback(interval="step", freeze_bn_after=2, freeze_observers_after=4, evaluate=None, latency_repeats=1)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=[qat])).fit(
        BoringClassifier(NormGeluBlock()), datamodule=digits8
    )
    assert timed[0] == ["dynamic", "static"]
    assert traced == ["dynamic"]  # static is the preflight's trace, not traced again
    assert qat.report.activations == faster
    assert qat.report.activation_ms == {faster: 1.0, timed[0][faster == "dynamic"]: 2.0}
    assert bool(_dynamic_linears(qat.quantized_model)) == (faster == "dynamic")
    assert any(line.startswith(f"activations: {faster} int8") for line in qat.report.summary())
    trained = {name: bool(fq.fake_quant_enabled[0]) for name, fq in ao.fake_quant_modules(qat.prepared.module)}
    assert all(on for name, on in trained.items() if name.endswith("weight_fake_quant"))
    activation = [on for name, on in trained.items() if not name.endswith("weight_fake_quant")]
    assert activation
    assert all(on == (faster == "static") for on in activation)  # QAT trained for what ships
    x, _ = digits8.splits["val"].tensors
    with torch.no_grad(), ao.quiet():
        torch.testing.assert_close(load_quantized(qat.artifact_path)(x), qat.quantized_model(x))


def test_a_cnn_is_not_timed_for_dynamic_activations(tmp_path, digits8, monkeypatch):
    def timing(networks, *args, **kwargs):
        assert "dynamic" not in networks
        return dict.fromkeys(networks, 1.0)

    monkeypatch.setattr(activations, "measure_latency", timing)
    qat = QATCallback(interval="step", freeze_bn_after=2, freeze_observers_after=4, evaluate=None, latency_repeats=1)
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[qat])).fit(BoringClassifier(), datamodule=digits8)
    assert (qat.report.activations, qat.report.activation_ms) == ("static", {})


def test_dynamic_on_request_whatever_the_timing(tmp_path, digits8):
    qat = QATCallback(
        interval="step", freeze_bn_after=2, freeze_observers_after=4, latency_repeats=1, activations="dynamic"
    )
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[qat])).fit(
        BoringClassifier(NormGeluBlock()), datamodule=digits8
    )
    assert qat.report.activations == "dynamic"
    assert _dynamic_linears(qat.quantized_model)
    assert qat.report.metrics["int8"]["val_acc"] > 0  # evaluated as it ships
    assert isinstance(load_quantized(qat.artifact_path, copies=1), torch.jit.ScriptModule)
    assert not isinstance(qat.quantized_model, nn.Linear)


def test_a_dynamic_run_s_checkpoint_converts_to_the_same_dynamic_artifact(tmp_path, digits8):
    qat = QATCallback(
        interval="step", freeze_bn_after=2, freeze_observers_after=4, evaluate=None, activations="dynamic"
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, callbacks=[qat]))
    trainer.fit(BoringClassifier(NormGeluBlock()), datamodule=digits8)
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    report = convert_checkpoint(
        BoringClassifier(NormGeluBlock()), tmp_path / "qat.ckpt", save_dir=str(tmp_path / "int8"), evaluate=None
    )
    assert report.activations == "dynamic"
    x, _ = digits8.splits["val"].tensors
    with torch.no_grad(), ao.quiet():
        torch.testing.assert_close(load_quantized(report.artifact)(x), qat.quantized_model(x))
    with pytest.raises(ValueError, match="activations='static' cannot be honoured"):
        convert_checkpoint(BoringClassifier(NormGeluBlock()), tmp_path / "qat.ckpt", activations="static")


def test_a_resumed_run_keeps_the_activations_it_trained_for(tmp_path, digits8, monkeypatch):
    monkeypatch.setattr(activations, "measure_latency", lambda networks, *a, **k: {"static": 1.0, "dynamic": 2.0})
    first = QATCallback(
        interval="step", freeze_bn_after=2, freeze_observers_after=4, evaluate=None, activations="dynamic"
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[first]))
    trainer.fit(BoringClassifier(NormGeluBlock()), datamodule=digits8)
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    resumed = QATCallback(interval="step", freeze_bn_after=2, freeze_observers_after=4, evaluate=None)  # auto: static
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "resumed", max_steps=5, callbacks=[resumed]))
    trainer.fit(BoringClassifier(NormGeluBlock()), datamodule=digits8, ckpt_path=tmp_path / "qat.ckpt")
    assert resumed.state.activations == resumed.report.activations == "dynamic"
    flags = [bool(fq.fake_quant_enabled[0]) for n, fq in ao.fake_quant_modules(resumed.prepared.module)]
    assert sum(flags) == 2  # the two Linears' weights; every activation's fake-quant stays off


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_a_hugging_face_encoder_converts_in_eager_mode_to_dynamic_int8(tmp_path, digits8, activations):
    """BERT's embeddings sum int8 tensors with `+` (no eager int8 kernel) and take an expanded (non-contiguous)
    buffer of token types: static eager int8 stops in setup, dynamic int8 (float between its int8 Linears) ships."""
    pytest.importorskip("transformers")
    from zoo import HFEncoder, IdsAndMaskClassifier, to_ids_and_mask

    qat = QATCallback(engine="eager", activations=activations, latency_repeats=1, freeze_observers_after=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[qat]))
    model = IdsAndMaskClassifier(HFEncoder())
    if activations == "static":
        with pytest.raises(PreflightError, match=r"QuantizedCPU"):
            trainer.fit(model, datamodule=digits8)
        assert trainer.global_step == 0
        return
    trainer.fit(model, datamodule=digits8)
    int8 = qat.quantized_model
    assert qat.report.mode == "eager"
    assert len(_dynamic_linears(int8)) == sum(isinstance(m, nn.Linear) for m in HFEncoder().modules())
    assert sum(isinstance(m, torch.ao.nn.quantized.Embedding) for m in int8.modules()) == 3  # words, positions, types
    assert "Embedding" not in qat.report.float_params
    assert "val_acc" in qat.report.metrics["int8"]
    x, _ = digits8.splits["val"].tensors
    artifact, inputs = load_quantized(qat.artifact_path), to_ids_and_mask(x[:8])
    with torch.no_grad():
        assert torch.equal(artifact(*inputs), int8(*inputs))
        assert torch.equal(artifact(*shorter(inputs)), int8(*shorter(inputs)))  # the trace kept the length dynamic


needs_pt2e = pytest.mark.skipif(pt2e.missing() is not None, reason=f"PT2E engine: {pt2e.missing()}")


def _per_batch_scales(int8):
    """How many activation scales the converted PT2E graph computes at run time (dynamic int8's choose_qparams)."""
    return sum("choose_qparams" in str(node.target) for node in int8.exported.graph.nodes)


@needs_pt2e
@pytest.mark.parametrize("faster", ["dynamic", "static"])
def test_pt2e_times_both_compiled_packages_and_trains_the_faster(tmp_path, digits8, monkeypatch, faster):
    """PT2E captures the activations into its graph: "auto" compiles both packages in setup, times them, and captures
    the network again when dynamic wins, so QAT trains the graph that ships."""
    timed = []

    def timing(networks, *args, **kwargs):  # the candidates' speed is machine-dependent: said here
        timed.append({name: type(network).__name__ for name, network in networks.items()})
        return {name: 1.0 if name == faster else 2.0 for name in networks}

    monkeypatch.setattr(activations, "measure_latency", timing)
    pl.seed_everything(0)
    qat = QATCallback(engine="pt2e", interval="step", freeze_observers_after=4, latency_repeats=1, monitor="val_acc")
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=[qat])).fit(
        BoringClassifier(NormGeluBlock()), datamodule=digits8
    )
    assert timed[0] == {"static": "CompiledNetwork", "dynamic": "CompiledNetwork"}  # timed as they ship
    assert qat.report.activations == qat.prepared.activations == faster
    assert qat.report.activation_ms[faster] == 1.0
    assert (_per_batch_scales(qat.quantized_model) > 0) == (faster == "dynamic")
    assert any(line.startswith(f"activations: {faster} int8") for line in qat.report.summary())
    assert abs(qat.report.metrics["int8"]["val_acc"] - qat.report.metrics["qat"]["val_acc"]) < 0.05
    x, _ = digits8.splits["val"].tensors
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(qat.artifact_path)(x), qat.quantized_model(x), atol=1e-2, rtol=0)


@needs_pt2e
def test_a_pt2e_checkpoint_is_prepared_again_for_the_activations_it_trained_for(tmp_path, digits8, monkeypatch):
    """Another machine (here: another timing) would choose static: resume and test keep the checkpoint's graph."""
    monkeypatch.setattr(activations, "measure_latency", lambda networks, *a, **k: {"static": 1.0, "dynamic": 2.0})
    first = QATCallback(engine="pt2e", activations="dynamic", interval="step", freeze_observers_after=4, evaluate=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[first]))
    trainer.fit(BoringClassifier(NormGeluBlock()), datamodule=digits8)
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    resumed = QATCallback(engine="pt2e", interval="step", freeze_observers_after=4, evaluate=None)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "resumed", max_steps=5, callbacks=[resumed]))
    trainer.fit(BoringClassifier(NormGeluBlock()), datamodule=digits8, ckpt_path=tmp_path / "qat.ckpt")
    assert resumed.prepared.activations == resumed.report.activations == "dynamic"
    assert _per_batch_scales(resumed.quantized_model) > 0
    tested = QATCallback(engine="pt2e", evaluate=None)
    metrics = pl.Trainer(**trainer_kwargs(tmp_path / "test", callbacks=[tested])).validate(
        BoringClassifier(NormGeluBlock()), datamodule=digits8, ckpt_path=tmp_path / "qat.ckpt"
    )
    assert tested.prepared.activations == "dynamic"
    assert metrics[0]["val_acc"] > 0
