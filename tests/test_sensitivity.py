import copy

import pytest
import torch
from conftest import UntraceableNet, pretrained_tiny, with_outlier_channels

from lightning_qat.quantization import ao, pt2e
from lightning_qat.quantization.prepare import prepare_model
from lightning_qat.quantization.sensitivity import MAX_DB, layer_sqnr, worst


def calibrated(net, digits8, mode="fx"):
    x = digits8.splits["train"].tensors[0][:64]
    prepared = prepare_model(net, "x86", mode, [], (x,)).module
    with torch.no_grad(), ao.quiet():
        for i in range(0, 512, 64):
            prepared(digits8.splits["train"].tensors[0][i : i + 64])
    return prepared.eval()


def val_batches(digits8, n=2):
    x = digits8.splits["val"].tensors[0]
    return [(x[i * 64 : (i + 1) * 64],) for i in range(n)]


def test_a_quantizer_stretched_by_a_few_channels_ranks_its_layer_lowest(float_tiny, digits8):
    plain = layer_sqnr(calibrated(pretrained_tiny(float_tiny).net, digits8), val_batches(digits8))
    outlier = layer_sqnr(
        calibrated(with_outlier_channels(pretrained_tiny(float_tiny)).net, digits8), val_batches(digits8)
    )
    assert list(plain) == ["conv1", "conv2", "fc1", "fc2"]  # every quantized layer, in network order
    assert worst(outlier, 1)[0][0] == "conv1"
    # 30 of its 32 channels are flattened to a few levels: a per-channel error, not the whole tensor's energy (which
    # the 2 large channels dominate: 29.6 dB, measured, above conv2's)
    assert outlier["conv1"] < 10 < plain["conv1"]
    assert all(db > 15 for db in plain.values()), plain


def test_measuring_moves_no_quantization_parameter(float_tiny, digits8):
    prepared = calibrated(pretrained_tiny(float_tiny).net, digits8)
    prepared.train()  # observers on, as during training
    before = copy.deepcopy(prepared.state_dict())
    layer_sqnr(prepared, val_batches(digits8))
    after = prepared.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert prepared.training


def test_eager_networks_and_layers_without_error(float_tiny, digits8):
    net = UntraceableNet()
    net.load_state_dict(float_tiny["state_dict"])
    prepared = calibrated(net, digits8, mode="eager")
    sqnr = layer_sqnr(prepared, val_batches(digits8))
    assert sorted(sqnr) == sorted(n for n, m in prepared.named_modules() if ao.weight_fake_quant(m) is not None)
    assert all(15 < db <= MAX_DB for db in sqnr.values()), sqnr
    ao.set_activation_fake_quant(prepared, False)
    for _, fq in ao.fake_quant_modules(prepared):
        fq.disable_fake_quant()
    assert set(layer_sqnr(prepared, val_batches(digits8)).values()) == {MAX_DB}  # nothing quantized: no error


@pytest.mark.skipif(pt2e.missing() is not None, reason=f"PT2E engine: {pt2e.missing()}")
def test_the_pt2e_graph_is_measured_too_and_the_outlier_layer_is_worst(float_tiny, digits8):
    """torchao's captured graph has no layer modules: the probes find the damaged layers as the hooks do in FX."""
    x = digits8.splits["train"].tensors[0][:256]
    net = with_outlier_channels(pretrained_tiny(float_tiny), factor=400.0).net
    prepared = prepare_model(net, "x86", "pt2e", [], (x[:64],)).module
    with torch.no_grad():
        prepared(x)
    prepared.eval()
    before = [node.name for node in prepared.exported.graph.nodes]
    sqnr = layer_sqnr(prepared, [(x[:128],)])
    assert list(sqnr) == ["conv1", "conv2", "fc1", "fc2"]
    # conv1's output quantizer flattens 30 of its 32 channels; conv2's int8 weights lose the 2 columns divided by 400
    assert max(sqnr["conv1"], sqnr["conv2"]) < 10 < 20 < min(sqnr["fc1"], sqnr["fc2"]), sqnr
    assert [node.name for node in prepared.exported.graph.nodes] == before  # measured on a copy
