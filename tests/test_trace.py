import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import BatchNormAct2d, NormActNet, UntraceableNet
from torch import nn

from lightning_qat.quantization import ao, pt2e
from lightning_qat.quantization.prepare import prepare_model
from lightning_qat.quantization.trace import conv_bn_pairs, trace

EXAMPLE8 = (torch.randn(4, 1, 8, 8),)


@pytest.fixture(autouse=True)
def int8_kernels_all_fast(monkeypatch):
    """Fusion counts here must not depend on this CPU's int8 kernels (a slow depthwise shape would stay float)."""
    monkeypatch.setattr(ao, "depthwise_slowdown", lambda backend, shape: 1.0)


def _with_statistics(net, x):
    """``net`` with BatchNorm statistics and affine parameters that are not the initial ones (so none stands in)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        net.train()
        for _ in range(3):
            net(x)
    return net


def test_a_batchnorm_that_calls_f_batch_norm_becomes_a_plain_batchnorm_that_follows_the_mode():
    x = torch.randn(16, 1, 8, 8)
    net = _with_statistics(NormActNet(), x)
    traced = trace(net.train())
    assert traced.batch_norms == ["bn1", "bn2"]
    assert type(traced.module.bn1) is nn.BatchNorm2d  # torch's own class: the fuser matches it
    assert traced.module.bn1.running_mean is net.bn1.running_mean  # the same tensors (and state-dict keys)
    assert isinstance(traced.module.bn2_act, nn.SiLU)  # the activation still runs after the norm, beside it
    assert "bn2_act" in traced.module.code
    assert "torch._assert" not in traced.module.code  # a second user of the conv output would block fusion
    with torch.no_grad():  # evaluation uses the running statistics, not the batch's
        assert torch.allclose(traced.module.eval()(x), net.eval()(x), atol=1e-6)
    before = int(net.bn1.num_batches_tracked)
    traced.module.train()(x)
    assert int(net.bn1.num_batches_tracked) == before + 1  # counted once, by the BatchNorm itself


class MixedKernelNormAct(nn.Module):
    """timm's mixnet block in short: depthwise convs of two kernel sizes, concatenated, then a BatchNormAct2d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.dw3, self.dw5 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.bn = BatchNormAct2d(16, nn.SiLU)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        a, b = self.stem(x).split(8, 1)
        return self.fc(self.bn(torch.cat([self.dw3(a), self.dw5(b)], 1)).mean((2, 3)))


def test_a_batchnorm_act_after_a_cat_converts_with_its_activation():
    """No convolution precedes the BatchNorm: torch converts it to a quantized BatchNorm, which has no children.

    Before, its activation stayed its child (``bn.act``) and the conversion failed: "Node bn_act target bn.act
    references nonexistent attribute act of bn" (timm's mixnet and dpn, #38).
    """
    x = torch.randn(16, 1, 8, 8)
    net = _with_statistics(MixedKernelNormAct(), x)
    reference = copy.deepcopy(net).eval()
    prepared = prepare_model(net, "x86", "fx", [], EXAMPLE8, kept={})
    assert prepared.conv_bn_pairs == 0
    prepared.module(x)
    int8 = prepared.engine.convert(copy.deepcopy(prepared.module).eval())
    assert ao.is_quantized_module(int8.bn)
    assert isinstance(int8.bn_act, nn.SiLU)
    with torch.no_grad():  # int8 after one calibration batch, random weights: 12% of the largest logit measured
        expected = reference(x)
        assert (int8(x) - expected).abs().max() <= 0.25 * expected.abs().max()


def test_conv_bn_pairs_name_what_torch_cannot_fuse():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert conv_bn_pairs(trace(NormActNet()).module) == [("conv1", "bn1", ""), ("conv2", "bn2", "")]
    assert conv_bn_pairs(trace(TwoUsers()).module) == [
        ("conv", "bn", "the convolution's output is also used elsewhere")
    ]
    prepared = prepare_model(TwoUsers(), "x86", "fx", [], EXAMPLE8)
    assert prepared.conv_bn_pairs == 1
    assert prepared.conv_bn_unfused == ["conv -> bn: the convolution's output is also used elsewhere"]


def test_batchnorm_act_fuses_with_its_convolution_and_freezes():
    prepared = prepare_model(NormActNet(), "x86", "fx", [], EXAMPLE8)
    assert (prepared.num_fused, prepared.conv_bn_pairs, prepared.conv_bn_unfused) == (2, 2, [])
    assert type(prepared.module.conv1).__name__ == "ConvBnReLU2d"  # the ReLU activation fused too
    assert type(prepared.module.conv2).__name__ == "ConvBn2d"  # SiLU has no int8 kernel: its own op after
    ao.freeze_bn_stats(prepared.module)
    assert all(m.freeze_bn for m in prepared.module.modules() if ao.is_conv_bn_qat(m))


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame in short: TensorFlow's "same" padding, computed from the input's size at run time."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)  # math.ceil: no FX tracing
            pads = [total // 2, total - total // 2, *pads]
        return nn.functional.conv2d(nn.functional.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation)


class SameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = Conv2dSame(1, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_a_same_padding_convolution_pads_statically_for_the_example_size_and_fuses():
    x = torch.randn(16, 1, 8, 8)
    net = _with_statistics(SameNet(), x)
    reference = copy.deepcopy(net).eval()
    prepared = prepare_model(net, "x86", "auto", [], (x[:2],))
    assert prepared.mode == "fx"  # before: FX could not trace math.ceil of a size, and eager fused nothing
    assert (prepared.num_fused, prepared.conv_bn_pairs, prepared.conv_bn_unfused) == (1, 1, [])
    assert ao.is_conv_bn_qat(prepared.module.conv)  # a plain Conv2d now, its BatchNorm folded in
    assert any("1 same-padding convolutions" in w and "(8x8)" in w for w in prepared.warnings)
    prepared.module.apply(torch.ao.quantization.disable_fake_quant)
    with torch.no_grad():
        assert torch.allclose(prepared.module.eval()(x), reference(x), atol=1e-5)


class SizeChecked(nn.Module):
    """Checks its input size as segmentation networks do (a condition on shapes), and calls a slice of its layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 10, 1))

    def forward(self, x):
        if x.shape[-1] % 4 != 0 or x.size(-2) % 4 != 0:
            raise ValueError("the input size must be divisible by 4")
        return self.features[3](self.features[:3](x)).mean((2, 3))  # `[:3]` is a new, unregistered Sequential


def test_conditions_on_input_shapes_are_decided_for_the_example_input_and_said():
    x = torch.randn(4, 1, 8, 8)
    traced = trace(SizeChecked().train(), (), (x[:2],))
    assert traced.specialized == ["ne(mod, 0) -> False", "ne(mod_1, 0) -> False"]  # `or` tests each side
    prepared = prepare_model(SizeChecked(), "x86", "auto", [], (x[:2],))
    assert prepared.mode == "fx"  # before: TraceError, then the eager fallback
    assert (prepared.conv_bn_pairs, prepared.conv_bn_unfused) == (1, [])
    assert any("2 conditions on input shapes were decided for the example input (8x8)" in w for w in prepared.warnings)


class ChecksAModuleOutput(nn.Module):
    """A condition on the shape of a module's output (U-Net decoders compare feature sizes)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[-1] != x.shape[-1]:
            y = nn.functional.interpolate(y, size=x.shape[-2:])
        return self.fc(y.mean((2, 3)))


def test_a_condition_on_a_module_output_shape_is_not_decided():
    """Deciding it would run the module inside the trace; it stays torch.fx's error, and "auto" takes the next engine.

    torch.export captures it (PT2E); without torchao, eager mode takes it.
    """
    with pytest.raises(torch.fx.proxy.TraceError):
        trace(ChecksAModuleOutput().train(), (), EXAMPLE8)
    fallback = "pt2e" if pt2e.missing() is None else "eager"
    assert prepare_model(ChecksAModuleOutput(), "x86", "auto", [], EXAMPLE8).mode == fallback


def test_a_condition_on_tensor_values_is_still_not_traced():
    """UntraceableNet branches on `x.max()`: deciding it for the example input would bake in one batch's data."""
    with pytest.raises(torch.fx.proxy.TraceError):
        trace(UntraceableNet().train(), (), EXAMPLE8)
    assert prepare_model(UntraceableNet(), "x86", "auto", [], EXAMPLE8).mode == "eager"


def _timm(name):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10)


# (timm network, Conv-BN pairs). Measured before this trace: 0 of them fused on efficientnet_b0, mobilenetv4 and
# regnety, 8 of 46 on mobilenetv3, and the prepared network normalized with batch statistics in evaluation.
TIMM = {
    "efficientnet_b0": 49,
    "tf_efficientnet_b0": 49,  # Conv2dSame: before, FX could not trace it and the eager fallback fused none
    "mobilenetv3_large_100": 46,
    "regnety_002": 44,
    "resnet18": 20,
    "densenet121": 59,
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_networks_fuse_every_conv_bn_pair_and_compute_the_float_function(name):
    x = torch.randn(4, 3, 32, 32)
    net = _with_statistics(_timm(name), x)
    reference = copy.deepcopy(net).eval()
    prepared = prepare_model(net, "x86", "auto", [], (x[:2],))
    assert prepared.mode == "fx"
    assert (prepared.conv_bn_pairs, prepared.conv_bn_unfused) == (TIMM[name], [])
    assert sum(ao.is_conv_bn_qat(m) for m in prepared.module.modules()) == TIMM[name]
    prepared.module.apply(torch.ao.quantization.disable_fake_quant)
    with torch.no_grad():
        expected, actual = reference(x), prepared.module.eval()(x)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max().clamp(min=1)


def _smp(name):
    smp = pytest.importorskip("segmentation_models_pytorch")
    architecture, encoder = name.split("(")
    return getattr(smp, architecture)(encoder.rstrip(")"), encoder_weights=None, classes=3)


def _torchvision(name):
    return getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=3)


# (network, Conv-BN pairs). smp's FPN and DeepLabV3Plus check their input size (a condition on shapes) and stopped in
# setup; torchvision's return a dict ("out"), which the comparison below reads.
SEGMENTATION = {
    "FPN(mobilenet_v2)": (_smp, 52),
    "DeepLabV3Plus(resnet18)": (_smp, 29),
    "Unet(resnet18)": (_smp, 30),
    "lraspp_mobilenet_v3_large": (_torchvision, 47),
    "deeplabv3_mobilenet_v3_large": (_torchvision, 53),
}


@pytest.mark.parametrize("name", list(SEGMENTATION))
def test_segmentation_networks_trace_fuse_and_compute_the_float_function(name):
    build, pairs = SEGMENTATION[name]
    x = torch.randn(2, 3, 64, 64)
    net = _with_statistics(build(name), x)
    reference = copy.deepcopy(net).eval()
    prepared = prepare_model(net, "x86", "auto", [], (x[:1],))
    assert prepared.mode == "fx"
    assert (prepared.conv_bn_pairs, prepared.conv_bn_unfused) == (pairs, [])
    prepared.module.apply(torch.ao.quantization.disable_fake_quant)
    with torch.no_grad():
        expected, actual = reference(x), prepared.module.eval()(x)
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        expected, actual = expected["out"], actual["out"]
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max().clamp(min=1)


class TorchReluNet(nn.Module):
    """Conv-BN followed by each spelling of ReLU that torch's fuser does not know as F.relu."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else 8, 8, 3, padding=1) for i in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(3))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        for conv, bn, relu in zip(self.convs, self.bns, (torch.relu, torch.relu_, F.relu_), strict=True):
            x = relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


def test_torch_relu_fuses_with_its_conv_bn_and_runs_in_int8():
    from lightning_qat.quantization.convert import to_int8
    from lightning_qat.quantization.measure import float_ops

    x = torch.randn(16, 1, 8, 8)
    net = _with_statistics(TorchReluNet(), x)
    reference = copy.deepcopy(net).eval()
    prepared = prepare_model(net, "x86", "fx", [], (x[:2],))
    fused = [m for m in prepared.module.modules() if type(m).__name__ == "ConvBnReLU2d"]
    assert len(fused) == 3
    qat = prepared.module.eval()
    qat.apply(torch.ao.quantization.disable_fake_quant)
    with torch.no_grad():
        assert torch.allclose(qat(x), reference(x), atol=1e-5)  # the in-place ones too: the same function
    qat.apply(torch.ao.quantization.enable_fake_quant)
    assert float_ops(to_int8(qat, "fx", "x86", (x[:2],))) == {}  # no ReLU left in float between int8 layers


class DropPath(nn.Module):
    """A user's stochastic depth: parameter-free, its forward reads self.training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1) >= self.p
        return x * keep / (1 - self.p)


class DropPathNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.drop = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), DropPath(0.5)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc((x + self.drop(self.conv2(x))).mean((2, 3)))


def test_a_module_reading_self_training_stays_a_module_that_follows_the_mode():
    x = torch.randn(16, 1, 8, 8)
    prepared = prepare_model(DropPathNet(), "x86", "fx", [], (x[:2],)).module  # traced in training mode
    prepared.apply(torch.ao.quantization.disable_fake_quant)
    ao.set_observers(prepared, False)
    with torch.no_grad():
        assert not torch.equal(prepared.train()(x), prepared(x))
        prepared.eval()
        assert torch.equal(prepared(x), prepared(x))
