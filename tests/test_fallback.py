import pytest
import torch
import torchvision
from conftest import UntraceableNet, calibrated, pretrained_tiny, with_outlier_channels, with_structural_outlier
from torch import nn

from lightning_qat.quantization import ao, pt2e
from lightning_qat.quantization.convert import cpu_eval_copy, to_int8
from lightning_qat.quantization.fallback import float_names, float_nodes, groups, train_float
from lightning_qat.quantization.sensitivity import layer_sqnr


def train_images(digits8):
    return digits8.splits["train"].tensors[0][:512]


def test_a_layer_takes_the_readers_of_its_output_quantizer_along(float_tiny, digits8):
    found = groups(calibrated(pretrained_tiny(float_tiny).net, train_images(digits8)))
    assert list(found) == ["conv1", "conv2", "fc1", "fc2"]  # no quantizer after another op that is no layer's output
    assert found["conv1"].names == ("conv1", "conv2")  # conv2 reads conv1's (fused Conv-BN-ReLU's) output quantizer
    # FX gives the pooling's and the flatten's outputs conv2's output quantizer (one module): it goes when all go
    assert found["conv2"].names == ("conv2", "adaptive_avg_pool2d", "flatten", "fc1")
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
    # FX gives the cat's output its inputs' quantizer (one module): the head reading it goes float with them
    assert set(found["a"].names) == set(found["b"].names) == {"a", "b", "cat", "head"}
    assert float_names([found["a"], found["head"]]) == list(found["a"].names)  # each once


def test_eager_groups_are_the_layers_alone(float_tiny, digits8):
    net = UntraceableNet()
    net.load_state_dict(float_tiny["state_dict"])
    qat = calibrated(net, train_images(digits8), mode="eager")
    found = groups(qat)
    assert all(group.names == (name,) and group.nodes == () for name, group in found.items())
    switched = train_float(qat, [found[next(iter(found))]])
    assert len(switched) == 2  # the layer's weight fake-quant and its own output fake-quant


needs_pt2e = pytest.mark.skipif(pt2e.missing() is not None, reason=f"PT2E engine: {pt2e.missing()}")


@needs_pt2e
def test_pt2e_groups_take_the_conv_bn_ops_and_the_readers_of_the_output_quantizer(float_tiny, digits8):
    """torchao's captured graph: a Conv-BN-ReLU is several ops before its quantizer; the int8 graph keeps them float."""
    x = train_images(digits8)
    qat = calibrated(with_outlier_channels(pretrained_tiny(float_tiny)).net, x, mode="pt2e")
    found = groups(qat)
    assert list(found)[:4] == ["conv1", "conv2", "fc1", "fc2"]
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


@pytest.mark.parametrize("mode", ["fx", pytest.param("pt2e", marks=needs_pt2e)])
@pytest.mark.parametrize("kind", ["gain", "concat"])
def test_the_quantizer_after_an_op_is_a_group_of_its_own(float_tiny, digits8, mode, kind):
    """A fixed gain or a concatenated branch 300x larger than the rest: the quantizer reading it (after the op, not a
    layer) flattens the other channels. Its group is the op and the conv reading it, and the gain's own constant; the
    lowest SQNR says where the damage is; kept float, int8 computes what the QAT network with that group's fake-quants
    off computes, and the damage goes."""
    x = train_images(digits8)
    qat = calibrated(with_structural_outlier(float_tiny, kind).net, x, mode, train=False)
    found = groups(qat)
    op = {"gain": "gain" if mode == "pt2e" else "mul", "concat": "cat"}[kind]
    [key] = [key for key, group in found.items() if group.names == (op, "conv2")]
    assert key.startswith("activation_post_process_")  # keyed by the quantizer: found again on resume
    sqnr = layer_sqnr(qat, [(x[:256],)], quantizers=True)
    lowest = min(sqnr, key=sqnr.get)  # what the search tries first
    chosen = [found[key]]
    if (kind, mode) == ("concat", "fx"):  # FX quantizes the concatenation twice: its inputs share one quantizer (the
        assert {"cat", "side.0", "conv1"} <= set(found[lowest].names)  # branches go float with it), its output another
        chosen.append(found[lowest])
    else:
        assert lowest == key
    val = digits8.splits["val"].tensors[0]
    int8 = to_int8(qat, mode, "x86", (x[:8],), float_nodes(chosen))
    all_int8 = to_int8(qat, mode, "x86", (x[:8],))
    reference = cpu_eval_copy(qat)
    assert key in train_float(reference, chosen)
    with torch.no_grad(), ao.quiet():
        expected = reference(val)
        error = (int8(val) - expected).abs().mean() / expected.abs().mean()
        before = (all_int8(val) - expected).abs().mean() / expected.abs().mean()
    assert error < 0.03 < 0.2 < before, (error, before)
