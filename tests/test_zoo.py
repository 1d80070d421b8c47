"""Every feature over a zoo of network shapes users bring, trained a few steps on digits (1x8x8 images)."""

import copy
import os

import lightning.pytorch as pl
import pytest
import torch
from conftest import BoringClassifier, TinyNet, trainer_kwargs
from lightning.pytorch.callbacks import Callback
from torch import nn
from zoo import (
    CLASSIFIER,
    EAGER,
    HUGGING_FACE,
    KEPT_FLOAT_TOLERANCE,
    LOGITS,
    MODE,
    NETWORK_INPUT,
    TOLERANCE,
    ZOO,
    NormGeluBlock,
    TokenClassifier,
    TokenNet,
)

from lightning_qat import QATCallback, load_quantized
from lightning_qat.export import aoti, pte
from lightning_qat.quantization import ao, pt2e, xnnpack
from lightning_qat.quantization.convert import cpu_eval_copy, to_int8
from lightning_qat.quantization.fallback import activation_quantizers, float_nodes, groups, train_float
from lightning_qat.quantization.inputs import map_tensors, shorter, tensors, with_batch
from lightning_qat.quantization.prepare import prepare_model


class BatchNormWatcher(Callback):
    """Snapshots every BatchNorm statistic when the BN freeze is in force, then checks nothing moved."""

    def __init__(self, qat):
        self.qat, self.snapshot, self.checked_steps = qat, None, 0

    @staticmethod
    def _stats(net):
        return {k: v.clone() for k, v in net.state_dict().items() if k.endswith(("running_mean", "running_var"))}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.qat.freezing.bn_frozen and self.snapshot is None:
            self.snapshot = self._stats(pl_module.net)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.snapshot is not None:
            after = self._stats(pl_module.net)
            assert after.keys() == self.snapshot.keys()
            moved = [k for k in after if not torch.equal(after[k], self.snapshot[k])]
            assert moved == [], f"moved after the BN freeze: {moved}"
            self.checked_steps += 1


@pytest.mark.parametrize("shape", list(ZOO))
def test_every_shape_trains_freezes_converts_and_reloads(tmp_path, digits8, shape):
    if shape in HUGGING_FACE:
        pytest.skip("engine='auto' captures it with torch.export: test_every_exportable_shape_on_the_pt2e_engine")
    pl.seed_everything(0)
    net = ZOO[shape]()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    float_trainer = pl.Trainer(**trainer_kwargs(tmp_path / "float", max_epochs=4))
    classifier = CLASSIFIER.get(shape, BoringClassifier)
    float_trainer.fit(classifier(net), datamodule=digits8)  # QAT fine-tunes a trained float network
    qat = QATCallback(
        engine=MODE.get(shape, "auto"),
        interval="step",
        freeze_bn_after=3,
        freeze_observers_after=5,
        evaluate=None,
        latency_repeats=1,
        activations="static",  # "auto" times static against dynamic on transformers: machine-dependent
    )
    watcher = BatchNormWatcher(qat)
    model = classifier(net)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, callbacks=[qat, watcher]))
    trainer.fit(model, datamodule=digits8)

    assert watcher.checked_steps == 5  # steps 3..7 ran with the BN freeze in force
    assert bool(watcher.snapshot) == has_bn  # ... and every BatchNorm statistic stood still
    x, _ = digits8.splits["val"].tensors
    inputs = NETWORK_INPUT.get(shape, lambda images: (images,))(x)
    logits = LOGITS.get(shape, lambda out: out)
    qat_net = model.net.eval()
    ao.set_observers(qat_net, False)
    assert qat.report.mode == ("eager" if shape in EAGER else "fx")
    with torch.no_grad(), ao.quiet():
        qat_out, int8_out = logits(qat_net(*inputs)), logits(qat.quantized_model(*inputs))
        assert torch.equal(logits(qat.quantized_model(*inputs)), int8_out)  # eval is deterministic
        assert torch.equal(logits(load_quantized(qat.artifact_path)(*inputs)), int8_out)
    # int8 reproduces the fake-quant network up to rounding: measured 0.5-4.0% mean relative error and 93-100% top-1
    # agreement over the zoo on torch 2.4.1 and 2.14.1 (a few networks have near-tied logits after 4 float epochs)
    max_error, min_agreement = TOLERANCE.get(shape, (0.06, 0.9))
    relative_error = ((int8_out - qat_out).abs().mean() / qat_out.abs().mean()).item()
    agreement = (qat_out.argmax(1) == int8_out.argmax(1)).float().mean().item()
    print(f"{shape}: relative error {relative_error:.4f}, agreement {agreement:.4f}")
    assert relative_error <= max_error, relative_error
    assert agreement >= min_agreement, agreement

    # the accuracy-budget fallback over every shape: each quantized layer has its SQNR in the report, and the worst
    # one's group kept float converts, runs, and computes what the QAT network with those fake-quants off computes
    sqnr = qat.report.layer_sqnr
    assert sqnr
    assert all(-100 <= db <= 100 for db in sqnr.values()), sqnr
    assert set(sqnr) <= {name for name, m in qat_net.named_modules() if ao.weight_fake_quant(m) is not None}
    group = groups(qat_net)[min(sqnr, key=sqnr.get)]
    if qat.report.mode == "fx":
        kept = to_int8(qat_net, "fx", qat.backend, inputs, float_nodes([group]))
        reference = cpu_eval_copy(qat_net)
        train_float(reference, [group])
        with torch.no_grad(), ao.quiet():
            kept_out, reference_out = logits(kept(*inputs)), logits(reference(*inputs))
        kept_error = ((kept_out - reference_out).abs().mean() / reference_out.abs().mean()).item()
        print(f"{shape}: {group.layer} float with {group.names}: relative error {kept_error:.4f}")
        assert kept_error <= KEPT_FLOAT_TOLERANCE.get(shape, max_error), kept_error


def _float_equivalence_error(net: nn.Module, inputs: tuple, mode: str = "auto", logits=None) -> float:
    """Max abs difference between the float network and its freshly prepared copy with fake-quant off, in eval."""
    pl.seed_everything(0)
    net.train()
    with torch.no_grad():
        for module in net.modules():  # every BatchNorm its own affine parameters, so none can stand for another
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        for _ in range(4):
            net(*inputs)  # BatchNorm statistics that are not the initial ones
    reference = copy.deepcopy(net).eval()
    prepared = prepare_model(net, "x86", mode, [], map_tensors(lambda t: t[:2], inputs)).module
    prepared.apply(torch.ao.quantization.disable_fake_quant)
    prepared.eval()
    logits = logits or (lambda out: out)
    with torch.no_grad():
        return (logits(prepared(*inputs)) - logits(reference(*inputs))).abs().max().item()


@pytest.mark.parametrize("shape", list(ZOO))
def test_preparing_changes_nothing_but_the_fake_quantization(digits8, shape):
    """Fusion only where it is equivalent: with fake-quant off, the prepared network is the float network."""
    if shape in HUGGING_FACE:
        pytest.skip("captured by torch.export (torchao's fake-quants): test_pt2e checks that capture's equivalence")
    x, _ = digits8.splits["train"].tensors
    inputs = NETWORK_INPUT.get(shape, lambda images: (images,))(x[:256])
    assert _float_equivalence_error(ZOO[shape](), inputs, MODE.get(shape, "auto"), LOGITS.get(shape)) <= 1e-5


def test_skipping_a_fused_member_keeps_it_float_and_unfused(tmp_path, digits8):
    qat = QATCallback(skip=["bn1"], evaluate=None, latency_repeats=1, freeze_bn_after=1, freeze_observers_after=1)
    model = BoringClassifier(TinyNet())
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[qat])).fit(model, digits8)
    int8 = qat.quantized_model
    assert type(int8.bn1.module) is nn.BatchNorm2d  # float, not folded into conv1
    assert type(int8.conv1).__name__ == "Conv2d"  # quantized, but no longer ConvReLU2d with bn1 folded in
    assert ao.is_quantized_module(int8.conv1)
    assert qat.report.kept_float == [{"name": "bn1", "why": "skip=", "by": "you"}]


class NoWeights(nn.Module):
    """A learnable scale on pooled pixels: nothing Conv/Linear-like to quantize."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x, (1, 10)).flatten(1) * self.scale


def test_a_network_with_nothing_to_quantize_says_so_at_setup(tmp_path, digits8):
    qat = QATCallback(evaluate=None, latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[qat]))
    with pytest.warns(UserWarning, match=r"nothing in `net` is quantizable"):
        trainer.fit(BoringClassifier(NoWeights()), digits8)
    assert not any(ao.is_quantized_module(m) and hasattr(m, "weight") for m in qat.quantized_model.modules())


def test_the_report_lists_what_stays_float(tmp_path, digits8):
    qat = QATCallback(
        skip=["fc2"], evaluate=None, freeze_bn_after=1, freeze_observers_after=1, activations="static"
    )  # "auto" could time dynamic int8 faster for this all-Linear network: machine-dependent
    model = BoringClassifier(NormGeluBlock())
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[qat])).fit(model, digits8)
    assert qat.report.float_params == {"Linear": 650}  # fc2: 64 x 10 + 10
    assert qat.report.network_params == sum(p.numel() for p in NormGeluBlock().parameters())
    assert "kept in float: 13.2% of the parameters (Linear 650)" in qat.report.summary()  # of 4,938


class SiLUNet(nn.Module):
    """EfficientNet's activation: torch has no int8 SiLU, so it runs in float between int8 convolutions."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(nn.functional.silu(self.conv1(x)))).mean((2, 3)))


def test_the_report_counts_the_ops_that_run_in_float_between_int8_layers(tmp_path, digits8):
    qat = QATCallback(evaluate=None, latency_repeats=1, freeze_bn_after=1, freeze_observers_after=1)
    model = BoringClassifier(SiLUNet())
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[qat])).fit(model, digits8)
    assert qat.report.float_ops == {"silu": 1}
    assert any(line.endswith("each costs a dequantize and a quantize): silu 1") for line in qat.report.summary())


@pytest.mark.parametrize("mode", ["fx", "eager"])
def test_an_embedding_network_passes_lightning_s_sanity_check_and_converts(tmp_path, digits8, mode):
    """Lightning validates before the first training step: the per-row embedding observer has seen nothing yet."""
    qat = QATCallback(engine=mode, export=[], latency_repeats=1, activations="static")  # all-Linear: not timed
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=3, num_sanity_val_steps=2, callbacks=[qat])
    )
    trainer.fit(TokenClassifier(TokenNet()), datamodule=digits8)
    assert qat.report.mode == mode
    assert any(isinstance(m, torch.ao.nn.quantized.Embedding) for m in qat.quantized_model.modules())
    assert "val_acc" in qat.report.metrics["int8"]


# The PT2E engine over the zoo. CI runs these shapes (about 15 s each); LIGHTNING_QAT_PT2E_ZOO=all runs every one.
PT2E_SHAPES = (
    "cnn",
    *HUGGING_FACE,
    "dict in, dict out",
    "shared conv",
    "shared conv-bn-relu block",
    "stochastic depth + dropout",
    "timm mobilenetv3 (hard-swish, hard-sigmoid gates)",
    "torchvision vit (nn.MultiheadAttention)",
    "untraceable cnn (eager)",
)


@pytest.mark.parametrize("shape", list(ZOO))
def test_every_exportable_shape_on_the_pt2e_engine(tmp_path, digits8, shape):
    """Trains, freezes and converts on torchao's engine, or stops in setup with torch.export's reason."""
    if pt2e.missing():
        pytest.skip(f"PT2E engine: {pt2e.missing()}")
    if shape not in PT2E_SHAPES and os.environ.get("LIGHTNING_QAT_PT2E_ZOO") != "all":
        pytest.skip("set LIGHTNING_QAT_PT2E_ZOO=all for every shape")
    pl.seed_everything(0)
    net = ZOO[shape]()
    classifier = CLASSIFIER.get(shape, BoringClassifier)
    pl.Trainer(**trainer_kwargs(tmp_path / "float", max_epochs=2)).fit(classifier(net), datamodule=digits8)
    engine = "auto" if shape in HUGGING_FACE else "pt2e"  # auto must find the engine that takes them
    # static activations: what "auto" would time (two compiles, a machine-dependent choice) is test_dynamic's
    qat = QATCallback(
        engine=engine, interval="step", freeze_bn_after=3, freeze_observers_after=5, evaluate=None, export=[],
        activations="static",
    )  # fmt: skip
    model = classifier(net)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=8, callbacks=[qat]))
    if shape in PT2E_STOPS:  # what torch.export or torchao cannot take stops in setup, naming why
        with pytest.raises((RuntimeError, ValueError), match=PT2E_STOPS[shape]):
            trainer.fit(model, datamodule=digits8)
        assert trainer.global_step == 0
        return
    trainer.fit(model, datamodule=digits8)
    x, _ = digits8.splits["val"].tensors
    inputs = NETWORK_INPUT.get(shape, lambda images: (images,))(x)
    logits = LOGITS.get(shape, lambda out: out)
    qat_net = model.net.eval()
    with torch.no_grad():
        qat_out, int8_out = logits(qat_net(*inputs)), logits(qat.quantized_model(*inputs))
    relative_error = ((int8_out - qat_out).abs().mean() / qat_out.abs().mean()).item()
    agreement = (qat_out.argmax(1) == int8_out.argmax(1)).float().mean().item()
    print(
        f"{shape} (pt2e): {qat.report.quantized_layers} int8 layers, relative error {relative_error:.4f}, "
        f"agreement {agreement:.4f}"
    )
    assert qat.report.mode == "pt2e"
    assert qat.report.quantized_layers > 0
    if shape in HUGGING_FACE:  # every Linear (and the ViT's patch convolution) int8; what has no int8 kernel is named
        assert qat.report.quantized_layers == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in ZOO[shape]().modules())
        assert {"layer_norm", "rms_norm", "scaled_dot_product_attention"} & set(qat.report.float_ops)
    max_error, min_agreement = PT2E_TOLERANCE.get(shape, (0.06, 0.9))
    assert relative_error <= max_error, relative_error
    assert agreement >= min_agreement, agreement
    # the shipped package takes batch 1 and the whole validation set, computing what its graph does
    package = aoti.save_pt2(qat.quantized_model, tmp_path / "model_int8.pt2", with_batch(inputs, 16))
    assert package.static == "", package.static
    assert package.shapes[0][0] is None
    loaded = load_quantized(package.path)
    for rows in (1, len(x)):
        assert aoti.output_error(loaded, qat.quantized_model, with_batch(inputs, rows)) < aoti.TOLERANCE, rows
    if any(not t.is_floating_point() for t in tensors(inputs)):  # token ids: any length (the graph's own check too)
        assert all(None in shape[1:] for shape in package.shapes), package.shapes
        assert aoti.output_error(loaded, qat.quantized_model, shorter(inputs)) < aoti.TOLERANCE
    # the accuracy-budget fallback on the captured graph: a layer's group kept float converts, runs, and computes what
    # the QAT network with those fake-quants off computes
    found = groups(qat_net)
    layers = [name for name in found if name not in activation_quantizers(qat_net)]  # not the quantizers after ops
    group = found[layers[len(layers) // 2]]
    kept = to_int8(qat_net, "pt2e", qat.backend, inputs, float_nodes([group]))
    assert pt2e.int8_layers(kept) < pt2e.int8_layers(qat.quantized_model)
    reference = cpu_eval_copy(qat_net)
    train_float(reference, [group])
    with torch.no_grad():
        kept_out, reference_out = logits(kept(*inputs)), logits(reference(*inputs))
    kept_error = ((kept_out - reference_out).abs().mean() / reference_out.abs().mean()).item()
    print(f"{shape} (pt2e): {group.layer} float with {group.names}: relative error {kept_error:.4f}")
    assert kept_error <= max_error, kept_error


# Measured on torch 2.14.1 / torchao 0.18: 14.5% and 88.5% (FX: within 6% / 90%); hard-swish and the SE gates' int8
# boundaries on torchao's side, not investigated.
PT2E_TOLERANCE = {"timm mobilenetv3 (hard-swish, hard-sigmoid gates)": (0.2, 0.8)}
PT2E_STOPS = {  # shape -> why it stops in setup
    "untraceable cnn (eager)": r"engine='pt2e' but torch.export cannot capture .*engine='auto'",  # data-dependent flow
    "shared conv": r"engine='pt2e' but \['conv'\] are called at several places",
    "shared conv-bn-relu block": r"engine='pt2e' but \['block'\] are called at several places",
    # a submodule named `meta`: the captured GraphModule's own `meta` attribute hides it (FX's engine renames it)
    "two inputs (image + meta)": r"engine='pt2e' but torch.export cannot capture .*attribute weight of meta",
    "two inputs (eager)": r"engine='pt2e' but torch.export cannot capture .*attribute weight of meta",
}


# by default (CI time: timm's mobilenetv3 takes 100 s here): "cnn" is tests/test_xnnpack.py's network, torchvision's
# mobilenet_v3 (hard-swish, squeeze-excite gates) test_cli's; LIGHTNING_QAT_XNNPACK_ZOO=all runs every shape
XNNPACK_SHAPES = ("dict in, dict out", "torchvision vit (nn.MultiheadAttention)")
# what runs outside the XNNPACK delegate, in ExecuTorch's portable float kernels: the ViT's LayerNorms and its attention
# mask arithmetic; the dict network's mean, whose float result is also an output (the same mean feeding only the
# classifier, as in "cnn", is delegated)
XNNPACK_OUTSIDE = {"torchvision vit (nn.MultiheadAttention)", "dict in, dict out"}


@pytest.mark.parametrize("shape", list(ZOO))
def test_every_exportable_shape_on_the_xnnpack_engine(tmp_path, digits8, shape):
    """Prepared with ExecuTorch's quantizer, trained, converted and lowered: the .pte computes what QAT computes."""
    if xnnpack.missing():
        pytest.skip(f"XNNPACK engine: {xnnpack.missing()}")
    if shape not in XNNPACK_SHAPES and os.environ.get("LIGHTNING_QAT_XNNPACK_ZOO") != "all":
        pytest.skip("set LIGHTNING_QAT_XNNPACK_ZOO=all for every shape")
    if shape in PT2E_STOPS:
        pytest.skip("stops in setup on the capture, as on the PT2E engine (test_every_exportable_shape_on_the_pt2e...)")
    pl.seed_everything(0)
    (x, y), (x_val, _) = digits8.splits["train"].tensors, digits8.splits["val"].tensors
    inputs_of = NETWORK_INPUT.get(shape, lambda images: (images,))
    logits = LOGITS.get(shape, lambda out: out)
    net = ZOO[shape]()

    def train(network, steps):
        optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
        network.train()
        for step in range(steps):
            rows = slice(32 * step % 1024, 32 * step % 1024 + 32)
            loss = nn.functional.cross_entropy(logits(network(*inputs_of(x[rows]))), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    train(net, 40)  # a float start whose logits are not near ties
    prepared = prepare_model(net, "xnnpack", "auto", [], inputs_of(x[:32]))
    train(prepared.module, 8)
    qat_net = prepared.module.eval()
    quantized = to_int8(qat_net, prepared.engine, "xnnpack", inputs_of(x[:32]))
    program = pte.save_pte(quantized, tmp_path / "model_int8.pte", inputs_of(x_val[:16]))
    assert program.max_batch >= 16, program.static  # the example's 16 rows, or 17 (see export/pte.py's save_pte)
    shipped = pte.PteNetwork(program.path, out_spec=program.out_spec)
    inputs = inputs_of(x_val)
    with torch.no_grad():
        qat_out, pte_out = logits(qat_net(*inputs)), logits(shipped(*inputs))
    relative_error = ((pte_out - qat_out).abs().mean() / qat_out.abs().mean()).item()
    agreement = (qat_out.argmax(1) == pte_out.argmax(1)).float().mean().item()
    print(
        f"{shape} (xnnpack): {program.delegated} ops delegated, outside {program.outside}, relative error "
        f"{relative_error:.4f}, agreement {agreement:.4f}"
    )
    # measured: 1.0-3.4% and 97-99% agreement; timm's mobilenetv3 16.8% and 91.5%, as on the x86 PT2E engine (its
    # hard-swish and gates' int8 boundaries)
    max_error, min_agreement = PT2E_TOLERANCE.get(shape, (0.1, 0.9))
    assert relative_error <= max_error, relative_error
    assert agreement >= min_agreement, agreement
    assert bool(program.outside) == (shape in XNNPACK_OUTSIDE), program.outside  # every zoo CNN fully delegated
