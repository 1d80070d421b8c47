import copy
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ONE_SIGNED, calibrated, one_signed_qat, pretrained_tiny
from torch.overrides import TorchFunctionMode

from lightning_qat.quantization import ao
from lightning_qat.quantization.prepare import freeze_batch_norm


def test_a_torch_without_the_quantization_api_fails_at_import_with_the_fix():
    """What a torch newer than the tested range would do once torch.ao.quantization is gone."""
    code = "import sys, torch; sys.modules['torch.ao.quantization'] = None; import lightning_qat"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "ImportError: lightning-qat needs torch.ao.quantization" in last
    assert f"torch {torch.__version__} does not provide it" in last
    assert "pip install 'torch<2.15'" in last


def test_quiet_silences_torch_quantization_deprecations_but_not_others():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ao.quiet():
            warnings.warn("torch.ao.quantization is deprecated and will be removed", DeprecationWarning, stacklevel=1)
            warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["an unrelated warning"]


def test_qnnpack_int8_transposed_conv_computes_the_float_one():
    assert ao.transposed_conv_int8_works("qnnpack")  # measured within 1% on torch 2.4.1 and 2.14.1


class _Upsampler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        return self.up(torch.relu(self.conv(x)))


@pytest.mark.parametrize("mode", ["fx", "eager"])
@pytest.mark.parametrize("works", [True, False])
def test_transposed_convs_stay_float_where_the_int8_kernel_is_wrong(monkeypatch, mode, works):
    from lightning_qat.quantization.convert import to_int8
    from lightning_qat.quantization.prepare import float_modules, prepare_model

    monkeypatch.setattr(ao, "transposed_conv_int8_works", lambda backend: works)
    x = (torch.randn(4, 1, 8, 8),)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = prepare_model(_Upsampler(), "x86", mode, [], x)
    assert not caught  # the torch-only layer reports what it did; the Lightning layer says it (rank 0)
    said = [w for w in prepared.warnings if "ConvTranspose layers stay float" in w]
    assert len(said) == (0 if works else 1)
    with torch.no_grad(), ao.quiet():
        prepared.module(*x)
    int8 = to_int8(prepared.module, mode, "x86", x)
    quantized = [m for m in int8.modules() if isinstance(m, torch.ao.nn.quantized.ConvTranspose2d)]
    assert len(quantized) == (1 if works else 0)
    assert ("up" in " ".join(float_modules(int8))) == (not works and mode == "eager")


def test_qnnpack_int8_depthwise_conv_does_not_saturate_above_the_observed_range():
    assert ao.depthwise_saturation("qnnpack") == 0  # its kernels accumulate in int32 (fbgemm's: 40 steps here)


class _Depthwise(torch.nn.Module):
    def __init__(self, depthwise: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8 if depthwise else 1)

    def forward(self, x):
        return self.dw(torch.relu(self.conv(x)))


@pytest.mark.parametrize("depthwise", [True, False])
@pytest.mark.parametrize("steps", [0, 40])
def test_a_saturating_depthwise_kernel_is_said_at_prepare_when_the_network_has_depthwise_convs(
    monkeypatch, depthwise, steps
):
    from lightning_qat.quantization.prepare import prepare_model

    monkeypatch.setattr(ao, "depthwise_saturation", lambda backend: steps)
    prepared = prepare_model(_Depthwise(depthwise), "fbgemm", "auto", [], (torch.randn(2, 1, 8, 8),))
    said = [w for w in prepared.warnings if "depthwise convolution saturates" in w]
    assert len(said) == (1 if depthwise and steps else 0)
    if said:
        assert "in depthwise convolutions (1 here)" in said[0]
        assert "backend='x86'" in said[0]
    skipped = prepare_model(_Depthwise(depthwise), "fbgemm", "auto", ["dw"], (torch.randn(2, 1, 8, 8),))
    assert not [w for w in skipped.warnings if "depthwise" in w]  # a float layer has no int8 kernel to worry about


@pytest.mark.parametrize("backend", ["x86", "fbgemm"])
def test_a_reduced_range_activation_fake_quant_clamps_where_the_int8_model_does(backend):
    """The scale of a 7-bit grid, the clamp of quint8: what torch's quantize (and ONNX's QuantizeLinear) compute."""
    fake_quant = ao.qconfig(backend).activation()
    fake_quant(torch.linspace(0, 1, 101))  # observed range [0, 1]
    fake_quant.disable_observer()
    assert float(fake_quant.scale) == pytest.approx(1 / 127)  # reduce_range: 127 steps over the observed range
    x = torch.linspace(-0.5, 3, 351)  # beyond the observed range on both sides
    int8 = torch.quantize_per_tensor(x, float(fake_quant.scale), int(fake_quant.zero_point), torch.quint8)
    with torch.no_grad():
        assert torch.equal(fake_quant(x), int8.dequantize())
    assert float(fake_quant(torch.tensor([3.0]))) == pytest.approx(255 / 127)  # not clamped at 1.0


@pytest.mark.parametrize("backend", ["x86", "fbgemm", "qnnpack"])
def test_int8_weights_are_the_fake_quantized_weights_qat_trained(backend):
    """torch's fused weight fake-quant scales by max|w| / 127, its conversion by max|w| / 127.5: 0.4% apart."""
    from lightning_qat.quantization.convert import to_int8
    from lightning_qat.quantization.prepare import prepare_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1))
    x = torch.randn(8, 3, 8, 8)
    prepared = prepare_model(net, backend, "fx", [], (x[:1],)).module
    with torch.no_grad(), ao.quiet():
        prepared(x)  # observe
    conv = prepared.get_submodule("2")
    with torch.no_grad(), ao.quiet():
        trained = conv.weight_fake_quant(conv.weight)  # what QAT computes with
    int8 = to_int8(prepared.eval(), "fx", backend, (x[:1],))
    converted = int8.get_submodule("2").weight().dequantize()
    assert torch.equal(converted, trained)


def _fake_quant_of(network: torch.nn.Module, layer: str):
    return next(m.weight_fake_quant for name, m in network.named_modules() if name.endswith(layer))


@pytest.mark.parametrize("mode", ["fx", "eager"])
def test_a_weight_channel_of_one_sign_gets_the_symmetric_grid(digits8, mode):
    """torch's fused kernel gives such a channel zero point -128 or 127 (an affine grid) under a symmetric qconfig:
    ONNX Runtime then ran mobilenet_v2 at 1.4x its float time, and OpenVINO ran 9 of its 17 depthwise convs in float."""
    from lightning_qat.quantization.convert import to_int8

    prepared, x = one_signed_qat(digits8, mode)
    fake_quant = _fake_quant_of(prepared, "depthwise")
    weight = next(m.weight for name, m in prepared.named_modules() if name.endswith("depthwise"))
    assert torch.equal(fake_quant.zero_point, torch.zeros(8, dtype=torch.int32))
    peak = weight.detach().abs().amax(dim=(1, 2, 3))
    for channel in ONE_SIGNED[:2]:  # the scale a two-signed channel of the same range gets: max|w| / 127 or / 128
        assert float(fake_quant.scale[channel]) in (
            pytest.approx(float(peak[channel]) / 127),
            pytest.approx(float(peak[channel]) / 128),
        )
    with torch.no_grad(), ao.quiet():
        trained = fake_quant(weight)
    int8 = to_int8(copy.deepcopy(prepared).eval(), mode, "x86", (x[:1],))
    converted = next(m for name, m in int8.named_modules() if name.endswith("depthwise")).weight()
    assert torch.equal(converted.q_per_channel_zero_points(), torch.zeros(8, dtype=torch.long))
    assert torch.equal(converted.dequantize(), trained)  # what QAT trained with, in every channel
    assert torch.equal(trained[3], torch.zeros_like(trained[3]))  # the pruned channel stays exactly zero
    fake_quant.disable_observer()  # frozen: the stored grid, not the fused kernel's recomputed one
    with torch.no_grad(), ao.quiet():
        assert torch.equal(fake_quant(weight), trained)


class Divisions(TorchFunctionMode):
    """Counts the elements of every tensor division's result inside the ``with``."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in ("div", "__truediv__", "true_divide") and isinstance(result, torch.Tensor):
            self.sizes.append(result.numel())
        return result


def _torch_way(network: torch.nn.Module) -> torch.nn.Module:
    """A copy running torch's own fused Conv-BN forward (the folded one taken back)."""
    copied = copy.deepcopy(network)
    assert ao.unfold_batch_norm(copied) == 2  # TinyNet's two Conv-BN pairs
    return copied


@pytest.mark.parametrize("mode", ["fx", "eager"])
def test_a_frozen_fused_conv_bn_trains_the_same_function_without_running_its_batch_norm(float_tiny, digits8, mode):
    """With running statistics the division and the BatchNorm cancel: the folded bias computes what torch's did."""
    x, y = next(iter(digits8.train_dataloader()))
    network = calibrated(pretrained_tiny(float_tiny).net, x, mode).train()
    # activations float: one rounding apart, an activation at a step's edge could round the other way on another
    # CPU's kernels; the weights' fake-quant stays (both forwards scale the same weight the same way)
    ao.set_activation_fake_quant(network, False)
    freeze_batch_norm(network)
    reference = _torch_way(network)
    calls = []
    for module in network.modules():
        if ao.is_conv_bn_qat(module):
            module.bn.register_forward_hook(lambda *_: calls.append(1))
    results = []
    for net in (reference, network):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}))
    assert calls == []  # one convolution with a folded bias, no BatchNorm
    (loss, grads), (folded_loss, folded_grads) = results
    torch.testing.assert_close(folded_loss, loss)
    assert folded_grads.keys() == grads.keys()
    assert any(".bn.weight" in n for n in grads)  # the BatchNorm's scale still learns, through the weight
    for name, grad in grads.items():
        torch.testing.assert_close(folded_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()))


@pytest.mark.parametrize("mode", ["fx", "eager"])
def test_a_learning_fused_conv_bn_divides_its_weight_not_its_output(float_tiny, digits8, mode):
    """With batch statistics the division moves onto the weight: the same loss, gradients and running statistics."""
    x, y = next(iter(digits8.train_dataloader()))
    network = calibrated(pretrained_tiny(float_tiny).net, x, mode).train()
    ao.set_activation_fake_quant(network, False)  # as above: no activation a rounding apart from another step
    ao.set_observers(network, False)  # both forwards fake-quantize the weights on the same grid
    reference = _torch_way(network)
    runs = []
    for net in (reference, network):
        calls: list[torch.Size] = []
        for module in net.modules():
            if ao.is_conv_bn_qat(module):
                module.bn.register_forward_pre_hook(lambda _m, args, calls=calls: calls.append(args[0].shape))
        with Divisions() as divisions:
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        stats = {n: b.clone() for n, b in net.named_buffers() if "running_" in n}
        runs.append((loss.detach(), grads, stats, calls, divisions.sizes))
    (loss, grads, stats, calls, sizes), (ours, our_grads, our_stats, our_calls, our_sizes) = runs
    assert our_calls == calls  # each BatchNorm still runs, on its conv's output
    assert len(calls) == 2
    assert max(sizes) >= x.shape[0] * 8  # torch's: every conv output divided (a batch of feature maps)
    assert max(our_sizes) <= max(p.numel() for p in network.parameters())  # ours: weights only
    torch.testing.assert_close(ours, loss)
    assert our_grads.keys() == grads.keys()
    # a conv bias before a BatchNorm with batch statistics has no gradient but rounding: tolerances from the largest
    top = max(float(grad.abs().max()) for grad in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-5 * top)
    for name, stat in stats.items():  # the running statistics moved by the same batch statistics
        torch.testing.assert_close(our_stats[name], stat)


def test_the_folded_forward_follows_copies_and_leaves_batch_statistics_to_torch(float_tiny, digits8):
    x, _ = next(iter(digits8.train_dataloader()))
    network = calibrated(pretrained_tiny(float_tiny).net, x).train()  # BatchNorm learning
    ao.set_activation_fake_quant(network, False)  # as above: no activation a rounding apart from another step
    reference = _torch_way(network)  # before either runs: training moves the observers
    torch.testing.assert_close(network(x), reference(x))
    freeze_batch_norm(network)
    network.eval()
    expected = _torch_way(network)(x)
    copied = copy.deepcopy(network)  # the CPU copy that converts, say
    for module in copied.modules():  # it computes with its own BatchNorm, not the original's
        if ao.is_conv_bn_qat(module):
            module.bn.running_mean += 1.0
    assert not torch.allclose(copied(x), expected)
    torch.testing.assert_close(_torch_way(copied)(x), copied(x))
    torch.testing.assert_close(network(x), expected)
