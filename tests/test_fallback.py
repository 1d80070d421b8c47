import pytest
import torch
import torchvision
from conftest import UntraceableNet, pretrained_tiny, with_outlier_channels
from torch import nn

from lightning_qat.quantization import ao, pt2e
from lightning_qat.quantization.convert import cpu_eval_copy, to_int8
from lightning_qat.quantization.fallback import float_names, float_nodes, groups, train_float
from lightning_qat.quantization.prepare import prepare_model


def calibrated(net, x, mode="fx"):
    prepared = prepare_model(net, "x86", mode, [], (x,)).module
    with torch.no_grad(), ao.quiet():
        for i in range(0, len(x), 64):
            prepared(x[i : i + 64])
    return prepared.eval()


def train_images(digits8):
    return digits8.splits["train"].tensors[0][:512]


def test_a_layer_takes_the_readers_of_its_output_quantizer_along(float_tiny, digits8):
    found = groups(calibrated(pretrained_tiny(float_tiny).net, train_images(digits8)))
    assert list(found) == ["conv1", "conv2", "fc1", "fc2"]
    assert found["conv1"].names == ("conv1", "conv2")  # conv2 reads conv1's (fused Conv-BN-ReLU's) output quantizer
    assert found["conv2"].names == ("conv2", "adaptive_avg_pool2d")
    assert found["fc1"].names == ("fc1", "fc2")
    assert found["fc2"].names == ("fc2",)  # its quantizer goes to the output: float with fc2


def test_int8_with_a_group_float_is_the_qat_network_with_its_fake_quants_off(float_tiny, digits8):
    """What the fallback converts and what it exports to ONNX / trains on agree, and the damage is gone."""
    x = train_images(digits8)
    qat = calibrated(with_outlier_channels(pretrained_tiny(float_tiny)).net, x)
    val = digits8.splits["val"].tensors[0]
    group = groups(qat)["conv1"]
    int8 = to_int8(qat, "fx", "x86", (x[:8],), float_nodes([group]))
    assert not ao.is_quantized_module(int8.get_submodule("conv1"))
    assert not ao.is_quantized_module(int8.get_submodule("conv2"))
    assert ao.is_quantized_module(int8.get_submodule("fc1"))
    reference = cpu_eval_copy(qat)
    switched = train_float(reference, [group])
    assert switched == ["activation_post_process_1", "conv1.weight_fake_quant", "conv2.weight_fake_quant"]
    all_int8 = to_int8(qat, "fx", "x86", (x[:8],))
    with torch.no_grad(), ao.quiet():
        expected = reference(val)
        error = (int8(val) - expected).abs().mean() / expected.abs().mean()
        before = (all_int8(val) - expected).abs().mean() / expected.abs().mean()
    assert error < 0.02 < 0.2 < before, (error, before)


def test_residual_adds_and_shared_cat_quantizers_go_float_together():
    net = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(16, 3, 32, 32)
    qat = calibrated(net, x)
    found = groups(qat)
    # the block's second conv writes into the residual add: the add reads its quantizer
    assert any(name.startswith("add") for name in found["layer1.0.conv2"].names), found["layer1.0.conv2"]
    int8 = to_int8(qat, "fx", "x86", (x[:2],), float_nodes([found["layer1.0.conv2"]]))
    with torch.no_grad(), ao.quiet():
        assert int8(x[:2]).shape == (2, 10)
    assert not ao.is_quantized_module(int8.get_submodule("layer1.0.conv2"))


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


def test_the_inputs_of_a_cat_share_one_quantizer_so_go_float_together():
    qat = calibrated(TwoBranches(), torch.randn(8, 3, 8, 8))
    found = groups(qat)
    assert set(found["a"].names) == set(found["b"].names) == {"a", "b", "cat"}
    assert float_names([found["a"], found["head"]]) == [*found["a"].names, "head"]


def test_eager_groups_are_the_layers_alone(float_tiny, digits8):
    net = UntraceableNet()
    net.load_state_dict(float_tiny["state_dict"])
    qat = calibrated(net, train_images(digits8), mode="eager")
    found = groups(qat)
    assert all(group.names == (name,) and group.nodes == () for name, group in found.items())
    switched = train_float(qat, [found[next(iter(found))]])
    assert len(switched) == 2  # the layer's weight fake-quant and its own output fake-quant


@pytest.mark.skipif(pt2e.missing() is not None, reason=f"PT2E engine: {pt2e.missing()}")
def test_pt2e_groups_take_the_conv_bn_ops_and_the_readers_of_the_output_quantizer(float_tiny, digits8):
    """torchao's captured graph: a Conv-BN-ReLU is several ops before its quantizer; the int8 graph keeps them float."""
    x = train_images(digits8)
    qat = calibrated(with_outlier_channels(pretrained_tiny(float_tiny)).net, x, mode="pt2e")
    found = groups(qat)
    assert list(found) == ["conv1", "conv2", "fc1", "fc2"]
    assert found["conv1"].names[:3] == ("conv1", "bn1", "relu1")  # then conv2, which reads conv1's output quantizer
    assert "conv2" in found["conv1"].names
    val = digits8.splits["val"].tensors[0]
    int8 = to_int8(qat, "pt2e", "x86", (x[:8],), float_nodes([found["conv1"]]))
    all_int8 = to_int8(qat, "pt2e", "x86", (x[:8],))
    assert pt2e.int8_layers(int8) == pt2e.int8_layers(all_int8) - 2
    reference = cpu_eval_copy(qat)
    switched = train_float(reference, [found["conv1"]])
    assert len(switched) == 3  # conv1's and conv2's weight fake-quants, and conv1's output quantizer
    with torch.no_grad():
        expected = reference(val)
        error = (int8(val) - expected).abs().mean() / expected.abs().mean()
        before = (all_int8(val) - expected).abs().mean() / expected.abs().mean()
    assert error < 0.02 < 0.1 < before, (error, before)
