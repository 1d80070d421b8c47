"""Every feature over a zoo of network shapes users bring, trained a few steps on digits (1x8x8 images)."""

import copy
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from conftest import BoringClassifier, NormActNet, TinyNet, UntraceableNet, trainer_kwargs
from lightning.pytorch.callbacks import Callback
from packaging.version import Version
from torch import nn

from lightning_qat import QATCallback, load_quantized
from lightning_qat.export import aoti
from lightning_qat.quantization import ao, pt2e
from lightning_qat.quantization.convert import cpu_eval_copy, to_int8
from lightning_qat.quantization.fallback import float_nodes, groups, train_float
from lightning_qat.quantization.inputs import map_tensors, with_batch
from lightning_qat.quantization.prepare import prepare_model


class LinearBnMLP(nn.Module):
    """Linear-BatchNorm1d-ReLU blocks (FX fuses them into LinearBn1d)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1, self.relu1 = nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(self.relu1(self.bn1(self.fc1(x.flatten(1)))))


class StandaloneBn(nn.Module):
    """A BatchNorm no conv precedes (after a residual add): it stays a BatchNorm of its own."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn(x + self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Conv1dNet(nn.Module):
    """The image read as a 1-channel sequence of 64 values."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.relu(self.bn(self.conv(x.flatten(1).unsqueeze(1)))).mean(2))


class StochasticNet(nn.Module):
    """Stochastic depth (as torchvision's networks use it) and a functional dropout on self.training."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.drop_path = torchvision.ops.StochasticDepth(0.2, "row")
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = x + self.drop_path(self.conv2(x))
        return self.fc(nn.functional.dropout(x.mean((2, 3)), 0.1, self.training))


class NormGeluBlock(nn.Module):
    """LayerNorm and GELU, which stay float, around quantized Linears."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.norm(self.fc1(x.flatten(1)))))


class SharedConv(nn.Module):
    """One Conv2d called twice, each call followed by its own BatchNorm: FX must not fuse bn1 into both."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn1(self.conv(x))) + torch.relu(self.bn2(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class SharedBlock(nn.Module):
    """A Conv-BN-ReLU block called twice: it stays float as a whole (FX would fuse its members apart)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.block(self.block(torch.relu(self.stem(x)))).mean((2, 3)))


class WeightNormNet(nn.Module):
    """Weight-normalized convolutions (the parametrization and the older hook), folded for QAT."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.utils.parametrizations.weight_norm(nn.Conv2d(1, 16, 3, padding=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based form
            self.conv2 = nn.utils.weight_norm(nn.Conv2d(16, 16, 3, padding=1, stride=2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def to_token_ids(x):
    """The 17 grey levels of the digits' pixels as token ids (integer input of shape (N, 64))."""
    return ((x * 0.4 + 0.3) * 16).round().clamp(0, 16).long().flatten(1)


class TokenNet(nn.Module):
    """Token ids (int64) through an Embedding and a Linear: the integer input must never be fake-quantized."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(17, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, ids):
        return self.fc(self.embedding(ids).mean(1))


class TokenClassifier(BoringClassifier):
    """Feeds the network token ids made from the images; tells QAT its input with `example_input_array`."""

    def __init__(self, net):
        super().__init__(net)
        self.example_input_array = torch.randint(0, 17, (2, 64))

    def forward(self, x):
        return self.net(to_token_ids(x))


def meta_features(x):
    """Per-row means of the image: the "metadata" second input (N, 8), float."""
    return x.flatten(2).mean(1).reshape(-1, 8, 8).mean(2)


class ImageAndMeta(nn.Module):
    """Two positional inputs, and a submodule called `meta` (FX's GraphModule has a `meta` attribute of its own)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.meta = nn.Linear(8, 16)
        self.fc = nn.Linear(32, 10)

    def forward(self, image, meta):
        pooled = torch.relu(self.bn(self.conv(image))).mean((2, 3))
        return self.fc(torch.cat([pooled, torch.relu(self.meta(meta))], 1))


class TwoInputClassifier(BoringClassifier):
    def __init__(self, net):
        super().__init__(net)
        self.example_input_array = (torch.zeros(2, 1, 8, 8), torch.zeros(2, 8))

    def forward(self, x):
        return self.net(x, meta_features(x))


class DictInOut(nn.Module):
    """A dict in (`{"image": ...}`), a dict out (`{"logits": ..., "features": ...}`)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, batch):
        features = torch.relu(self.bn(self.conv(batch["image"]))).mean((2, 3))
        return {"logits": self.fc(features), "features": features}


class DictClassifier(BoringClassifier):
    def __init__(self, net):
        super().__init__(net)
        self.example_input_array = ({"image": torch.zeros(2, 1, 8, 8)},)

    def forward(self, x):
        return self.net({"image": x})["logits"]


class Decoder(nn.Module):
    """A ConvTranspose2d upsampling path (per-tensor int8 weights: no per-channel transposed-conv kernels)."""

    def __init__(self):
        super().__init__()
        self.down, self.bn = nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.up(torch.relu(self.bn(self.down(x))))).flatten(1))


class TorchvisionConvNeXt(nn.Module):
    """torchvision's ConvNeXt (stochastic depth, LayerNorm2d, GELU, layer scale), two tiny stages."""

    def __init__(self):
        super().__init__()
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        blocks = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
        self.convnext = ConvNeXt(blocks, stochastic_depth_prob=0.3, num_classes=10)

    def forward(self, x):
        return self.convnext(x.expand(-1, 3, -1, -1))


class Timm(nn.Module):
    """A timm network (random weights, nothing downloaded) on the 1x8x8 digits, resized where it needs more pixels."""

    def __init__(self, name: str, size: int = 8, **kwargs) -> None:
        super().__init__()
        timm = pytest.importorskip("timm")
        self.size = size
        self.net = timm.create_model(name, pretrained=False, num_classes=10, in_chans=1, **kwargs)

    def forward(self, x):
        if self.size != 8:  # decided at construction: a condition on x.shape would not trace
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x)


class TorchvisionViT(nn.Module):
    """torchvision's VisionTransformer (nn.MultiheadAttention in every block), 2x2 patches of the digits."""

    def __init__(self):
        super().__init__()
        self.vit = torchvision.models.VisionTransformer(
            image_size=8, patch_size=2, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        )

    def forward(self, x):
        return self.vit(x.expand(-1, 3, -1, -1))


class TorchvisionSwin(nn.Module):
    """torchvision's Swin (shifted windows; qkv / proj Linears torchvision calls through a function), 2 stages."""

    def __init__(self):
        super().__init__()
        self.swin = torchvision.models.SwinTransformer(
            patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2], num_classes=10
        )

    def forward(self, x):
        return self.swin(x.expand(-1, 3, -1, -1))


class TextEncoder(nn.Module):
    """Token ids through nn.TransformerEncoder with a padding mask (id 0), any sequence length up to 64."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(18, 32, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(1, 64, 32))
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, ids):
        padding = ids == 0
        x = self.embedding(ids) + self.position[:, : ids.shape[1]]
        return self.fc(self.encoder(x, src_key_padding_mask=padding).mean(1))


def to_padded_ids(x):
    """The digits' pixels as ids 1..17 (grey levels), the last row padding (id 0): (N, 64) int64."""
    ids = to_token_ids(x) + 1
    ids[:, 56:] = 0
    return ids


class PaddedTokenClassifier(BoringClassifier):
    def __init__(self, net):
        super().__init__(net)
        self.example_input_array = to_padded_ids(torch.zeros(2, 1, 8, 8))

    def forward(self, x):
        return self.net(to_padded_ids(x))


CLASSIFIER = {  # the others: BoringClassifier, images in
    "token ids + embedding": TokenClassifier,
    "token ids + embedding (eager)": TokenClassifier,
    "text encoder (nn.TransformerEncoder, padding mask)": PaddedTokenClassifier,
    "two inputs (image + meta)": TwoInputClassifier,
    "two inputs (eager)": TwoInputClassifier,
    "dict in, dict out": DictClassifier,
    "dict in, dict out (eager)": DictClassifier,
}
NETWORK_INPUT = {  # the network's positional inputs made from images
    "token ids + embedding": lambda x: (to_token_ids(x),),
    "token ids + embedding (eager)": lambda x: (to_token_ids(x),),
    "text encoder (nn.TransformerEncoder, padding mask)": lambda x: (to_padded_ids(x),),
    "two inputs (image + meta)": lambda x: (x, meta_features(x)),
    "two inputs (eager)": lambda x: (x, meta_features(x)),
    "dict in, dict out": lambda x: ({"image": x},),
    "dict in, dict out (eager)": lambda x: ({"image": x},),
}
# Eager mode computes `.mean()` of the int8 conv output in int8 at that output's scale, where the fake-quant network
# averages in float (eager mode observes module outputs only; FX also observes the mean): measured 9.6% / 9.5% relative
# error and 87% / 87% top-1 agreement on torch 2.14.1 / 2.4.1 (FX: 2.7% / 2.7%, 95% / 96%).
# The eager token network averages its quantized embedding output the same way: measured 6.3% on torch 2.14.1.
# timm's mobilenetv3 and regnety were 18.7% / 77.8% and 7.2% / 97.4% while torch converted weights with another scale
# than its fake-quant trained with (ao.WeightFakeQuantize); now 0.0% / 100% both.
TOLERANCE = {
    "dict in, dict out (eager)": (0.12, 0.85),
    "token ids + embedding (eager)": (0.12, 0.85),
}
# The worst layer's group kept float against the QAT network with those fake-quants off: 0-4.4% over the zoo on torch
# 2.14.1. On torch 2.4.1 the ViT's is far off, by which group the short training leaves worst: 13.0% (an in-projection
# with its attention core) and 22.6% (conv_proj with the class-token cat) measured; torch 2.4.1's FX conversion of
# those groups, not investigated (the fallback search evaluates the real int8 model, so its metric stays right).
KEPT_FLOAT_TOLERANCE = (
    {"torchvision vit (nn.MultiheadAttention)": 0.3} if Version(torch.__version__) < Version("2.5") else {}
)
LOGITS = {"dict in, dict out": lambda out: out["logits"], "dict in, dict out (eager)": lambda out: out["logits"]}
MODE = {
    "token ids + embedding (eager)": "eager",
    "two inputs (eager)": "eager",
    "dict in, dict out (eager)": "eager",
    "convtranspose decoder (eager)": "eager",
}
# What mode="auto" (or the MODE above) must end in, for every shape: FX unless tracing cannot work.
EAGER = {
    "untraceable cnn (eager)",  # data-dependent control flow
    "two inputs (image + meta)",  # a submodule named `meta` collides with GraphModule.meta
    *MODE,
}

ZOO = {
    "token ids + embedding": TokenNet,
    "token ids + embedding (eager)": TokenNet,
    "shared conv": SharedConv,
    "shared conv-bn-relu block": SharedBlock,
    "weight-norm convs": WeightNormNet,
    "cnn": TinyNet,
    "untraceable cnn (eager)": UntraceableNet,
    "linear-bn1d mlp": LinearBnMLP,
    "standalone bn": StandaloneBn,
    "conv1d": Conv1dNet,
    "stochastic depth + dropout": StochasticNet,
    "layernorm + gelu": NormGeluBlock,
    "two inputs (image + meta)": ImageAndMeta,
    "two inputs (eager)": ImageAndMeta,
    "dict in, dict out": DictInOut,
    "dict in, dict out (eager)": DictInOut,
    "convtranspose decoder": Decoder,
    "convtranspose decoder (eager)": Decoder,
    "torchvision convnext (stochastic depth)": TorchvisionConvNeXt,
    "timm-style BatchNormAct2d": NormActNet,
    "timm resnet": lambda: Timm("test_resnet"),
    "timm efficientnet (BatchNormAct2d, squeeze-excite)": lambda: Timm("test_efficientnet"),
    "timm mobilenetv3 (hard-swish, hard-sigmoid gates)": lambda: Timm("mobilenetv3_small_050"),
    "timm regnety": lambda: Timm("regnety_002"),
    "timm convnext (LayerNorm2d, GELU)": lambda: Timm("test_convnext", size=32),
    "torchvision vit (nn.MultiheadAttention)": TorchvisionViT,
    "text encoder (nn.TransformerEncoder, padding mask)": TextEncoder,
    "torchvision swin (shifted window attention)": TorchvisionSwin,
    "timm deit (Linear + scaled_dot_product_attention)": lambda: Timm(
        "deit_tiny_patch16_224", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2
    ),
    "timm swin (window attention)": lambda: Timm(
        "swin_tiny_patch4_window7_224",
        img_size=8,
        patch_size=2,
        window_size=2,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(2, 2),
    ),
}


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


def digit_masks(x, y):
    """Segmentation masks from the digits: pixels brighter than the middle grey take the digit's class (1..10)."""
    return torch.where(x[:, 0] > 0.5, y[:, None, None] + 1, 0)


class TinySegmenter(nn.Module):
    """A DeepLab-shaped network: a strided stem, an atrous convolution, `out` and `aux` heads upsampled to the input."""

    def __init__(self, classes: int = 11):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.atrous = nn.Sequential(nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.BatchNorm2d(32), nn.ReLU())
        self.head, self.aux = nn.Conv2d(32, classes, 1), nn.Conv2d(32, classes, 1)

    def forward(self, x):
        features = self.atrous(self.stem(x))
        up = lambda t: nn.functional.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
        return {"out": up(self.head(features)), "aux": up(self.aux(features))}


class Segmentation(pl.LightningModule):
    """A segmentation LightningModule: cross-entropy on `out` and `aux`, mIoU (torchmetrics) on `out`."""

    def __init__(self, net):
        super().__init__()
        from torchmetrics.classification import MulticlassJaccardIndex

        self.net, self.val_miou = net, MulticlassJaccardIndex(11)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, masks = self(x), digit_masks(x, y)
        return nn.functional.cross_entropy(out["out"], masks) + 0.4 * nn.functional.cross_entropy(out["aux"], masks)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_miou(self(x)["out"].argmax(1), digit_masks(x, y))
        self.log("val_miou", self.val_miou)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_a_segmentation_network_converts_evaluates_miou_and_ships_its_dict(tmp_path, digits8):
    pl.seed_everything(0)
    net = TinySegmenter()
    pl.Trainer(**trainer_kwargs(tmp_path / "float", max_epochs=6)).fit(Segmentation(net), digits8)
    qat = QATCallback(freeze_bn_after=1, freeze_observers_after=1, latency_repeats=2)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[qat])).fit(Segmentation(net), digits8)
    miou = {row: metrics["val_miou"] for row, metrics in qat.report.metrics.items()}
    print(miou)
    assert qat.report.mode == "fx"
    assert miou["float"] > 0.3  # learned (11 classes; background and one digit class per image)
    assert abs(miou["int8"] - miou["qat"]) <= 0.03  # int8 computes what QAT trained
    x = digits8.splits["val"].tensors[0][:4]
    with torch.no_grad(), ao.quiet():
        shipped = load_quantized(qat.artifact_path)(x)
    assert set(shipped) == {"out", "aux"}  # the artifact returns the network's structure
    assert shipped["out"].shape == (4, 11, 8, 8)


def pasted_digits(x, y, canvas: int = 64, scale: int = 3, seed: int = 0):
    """Detection data from the digits: each digit, scaled `scale` times, pasted at a random place on a blank canvas.

    Returns 3-channel canvases and torchvision's targets (one box per image, labels 1..10).
    """
    generator = torch.Generator().manual_seed(seed)
    size = x.shape[-1] * scale
    images, targets = torch.zeros(len(x), 3, canvas, canvas), []
    for i, (digit, label) in enumerate(zip(x[:, 0], y, strict=True)):
        left, top = torch.randint(0, canvas - size + 1, (2,), generator=generator).tolist()
        images[i, :, top : top + size, left : left + size] = digit.repeat_interleave(scale, 0).repeat_interleave(
            scale, 1
        )
        box = torch.tensor([[left, top, left + size, top + size]], dtype=torch.float32)
        targets.append({"boxes": box, "labels": label.view(1) + 1})
    return images, targets


class Detection(pl.LightningModule):
    """torchvision's SSDlite (MobileNetV3 backbone, random weights) on pasted digits at 64 px; mAP in validation."""

    def __init__(self, canvas: int = 64):
        super().__init__()
        from torchmetrics.detection import MeanAveragePrecision
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large
        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        self.model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=11)
        mean, std = self.model.transform.image_mean, self.model.transform.image_std
        self.model.transform = GeneralizedRCNNTransform(canvas, canvas, mean, std, fixed_size=(canvas, canvas))
        self.canvas, self.val_map = canvas, MeanAveragePrecision()
        self.example_input_array = torch.zeros(2, 3, canvas, canvas)

    def forward(self, images):
        return self.model(list(images))

    def training_step(self, batch, batch_idx):
        images, targets = pasted_digits(*batch, self.canvas, seed=batch_idx)
        return sum(self.model(list(images), targets).values())

    def validation_step(self, batch, batch_idx):
        images, targets = pasted_digits(*batch, self.canvas, seed=10_000 + batch_idx)
        self.val_map.update(self(images), targets)

    def on_validation_epoch_end(self):
        result = self.val_map.compute()
        self.log_dict({"val_map50": result["map_50"], "val_mar100": result["mar_100"]})
        self.val_map.reset()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def test_detection_quantizes_the_backbone_and_int8_detects_what_qat_detects(tmp_path, digits8):
    from torchvision.ops import box_iou

    pytest.importorskip("pycocotools")
    pl.seed_everything(0)
    detector = Detection()
    pl.Trainer(**trainer_kwargs(tmp_path / "float", max_epochs=6)).fit(detector, digits8)
    qat = QATCallback(module="model.backbone", freeze_bn_after=1, freeze_observers_after=1, latency_repeats=2)
    pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[qat])).fit(detector, digits8)
    metrics = qat.report.metrics
    print(metrics)
    assert metrics["qat"]["val_mar100"] > 0.1  # it finds digits (a few epochs; the full benchmark trains longer)
    for name in ("val_map50", "val_mar100"):  # the user's mAP on the whole detector, int8 backbone inside
        assert abs(metrics["int8"][name] - metrics["qat"][name]) <= 0.03
    assert qat.report.module == "model.backbone"
    assert f"(`model.backbone` only: {sum(p.numel() for p in detector.model.head.parameters()):,} parameters" in (
        "\n".join(qat.report.summary())
    )
    heads = detector.model.head
    assert not any(ao.is_fake_quant(m) for m in heads.modules())  # the heads stay float
    # int8 computes what QAT trained: the same best box and label for (nearly) every validation canvas
    x, y = digits8.splits["val"].tensors
    images, _ = pasted_digits(x[:200], y[:200], seed=1)
    int8_detector = copy.deepcopy(detector.model).eval()
    int8_detector.backbone = qat.quantized_model
    with torch.no_grad(), ao.quiet(), ao.engine(qat.backend):
        qat_best = [(d["labels"][0], d["boxes"][0]) for d in detector.model.eval()(list(images))]
        int8_best = [(d["labels"][0], d["boxes"][0]) for d in int8_detector(list(images))]
        shipped = load_quantized(qat.artifact_path)(detector.model.transform(list(images[:2]))[0].tensors)
    pairs = zip(qat_best, int8_best, strict=True)
    same = [a[0] == b[0] and box_iou(a[1][None], b[1][None]).item() > 0.9 for a, b in pairs]
    print("top detection agreement", sum(same) / len(same))
    assert sum(same) / len(same) >= 0.9  # measured 96% (40% with the fused convs' weights 5% off at conversion)
    assert list(shipped) == [str(i) for i in range(6)]  # the backbone's feature maps, as the heads take them


# The PT2E engine over the zoo. CI runs these shapes (about 15 s each); LIGHTNING_QAT_PT2E_ZOO=all runs every one.
PT2E_SHAPES = (
    "cnn",
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
    qat = QATCallback(
        engine="pt2e", interval="step", freeze_bn_after=3, freeze_observers_after=5, evaluate=None, export=[]
    )
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
    assert qat.report.quantized_layers > 0
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
