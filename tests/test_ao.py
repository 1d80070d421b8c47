import subprocess
import sys
import warnings

import pytest
import torch

from lightning_qat.quantization import ao


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
