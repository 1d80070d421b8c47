"""The PT2E engine (torch.export + torchao): capture, train/eval switching, BatchNorm arguments, convert."""

import copy
import inspect

import pytest
import torch
from conftest import ONE_SIGNED, Depthwise, TinyNet, UntraceableNet
from torch import nn

from lightning_qat import PT2EUnavailable
from lightning_qat.quantization import ao, pt2e, xnnpack
from lightning_qat.quantization.prepare import freeze_batch_norm, prepare_model

pytestmark = pytest.mark.skipif(pt2e.missing() is not None, reason=f"PT2E engine: {pt2e.missing()}")


class OwnArgs(nn.Module):
    """BatchNorm with MobileNetV3's eps and a small momentum, tiny running variances, and dropout p=0.2."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, eps=1e-3, momentum=0.01)
        self.drop = nn.Dropout(0.2, inplace=inplace)  # in place: torchvision's classifiers
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.bn.running_var.fill_(1e-3)  # eps 1e-3 vs torchao's 1e-5 then changes every output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


def without_fake_quant(network: nn.Module) -> nn.Module:
    for _, fq in ao.fake_quant_modules(network):
        fq.disable_fake_quant()
        fq.disable_observer()
    return network


def test_missing_names_the_install_command(monkeypatch):
    monkeypatch.setattr(pt2e.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PT2EUnavailable, match=r"pip install 'lightning-qat\[pt2e\]'"):
        pt2e.require()


def test_batch_norm_keeps_its_eps_and_momentum():
    torch.manual_seed(0)
    network, x = OwnArgs().eval(), torch.randn(16, 1, 8, 8)
    expected = network(x)
    prepared = without_fake_quant(pt2e.prepare(copy.deepcopy(network), (x,), "x86"))
    prepared.eval()
    torch.testing.assert_close(prepared(x), expected, rtol=1e-4, atol=1e-5)
    # one training step moves the running mean by the network's own momentum
    network.train()
    prepared.train()
    network(x)
    prepared(x)
    torch.testing.assert_close(prepared.exported.bn.running_mean, network.bn.running_mean)


@pytest.mark.parametrize("inplace", [False, True])
def test_train_eval_switching_keeps_dropout_p_and_freezes_batch_norm(inplace):
    torch.manual_seed(0)
    x = torch.randn(256, 1, 8, 8)
    prepared = without_fake_quant(pt2e.prepare(OwnArgs(inplace), (x[:16],), "x86"))
    prepared.train()
    dropout = [n for n in prepared.exported.graph.nodes if "dropout" in str(n.target)]
    assert [n.args[1] for n in dropout] == [0.2]
    assert dropout[0].args[2] is True
    prepared.eval()
    assert dropout[0].args[2] is False
    assert not prepared.exported.training
    prepared.train()
    freeze_batch_norm(prepared)
    before = prepared.exported.bn.running_mean.clone()
    prepared(x)
    torch.testing.assert_close(prepared.exported.bn.running_mean, before)  # frozen: no update in training
    assert prepared.training
    assert dropout[0].args[2] is True


class DecidesOnTraining(nn.Module):
    """Decisions in Python on ``self.training``, as timm and torchvision write them: captured as their training branch.

    A drop path (timm's ``drop_path``: ``new_empty(...).bernoulli_(keep).div_(keep)``; at keep 0.5 torch.export drops
    the argument, it is bernoulli's default) and an attention whose ``dropout_p`` is chosen from ``self.training``.
    """

    def __init__(self):
        super().__init__()
        self.conv, self.qkv = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8, 24)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv(x).flatten(2).transpose(1, 2)  # (batch, 64 tokens, 8)
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, -1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.3 if self.training else 0.0).squeeze(1)
        if self.training:
            keep = 0.5
            y = y * y.new_empty(y.shape[0], 1, 1).bernoulli_(keep).div_(keep)
        return self.fc((x + y).mean(1))


def test_decisions_on_self_training_follow_train_and_eval_after_capture():
    """Before: captured in training mode, the drop path and the attention dropout stayed on in eval()."""
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    network = DecidesOnTraining()
    reference = copy.deepcopy(network).eval()
    prepared = without_fake_quant(pt2e.prepare(network, (x[:16],), "x86"))
    with torch.no_grad():
        prepared.eval()
        torch.testing.assert_close(prepared(x), reference(x), rtol=1e-4, atol=1e-5)  # the float function, exactly
        torch.testing.assert_close(prepared(x), prepared(x), rtol=0, atol=0)
        prepared.train()
        assert not torch.equal(prepared(x), prepared(x))  # training: the drop path and dropout again
        evaluated = copy.deepcopy(prepared).eval()  # a copy switches too (the preflight's and the conversion's)
        torch.testing.assert_close(evaluated(x), reference(x), rtol=1e-4, atol=1e-5)


def test_observers_are_found_paused_and_restored():
    x = torch.randn(16, 1, 8, 8)
    prepared = pt2e.prepare(TinyNet(), (x,), "x86")
    prepared(x)
    fake_quants = ao.fake_quant_modules(prepared)
    assert len(fake_quants) >= 8  # input, 4 weights, activations
    saved = ao.pause_observers(prepared)
    prepared.eval()  # as Lightning's validation loop
    state = copy.deepcopy(prepared.state_dict())
    prepared(x * 10)
    for key, value in prepared.state_dict().items():
        torch.testing.assert_close(value, state[key])
    ao.restore_observers(prepared, saved)
    assert all(bool(fq.observer_enabled[0]) for _, fq in fake_quants)
    low, high = ao.observer_range(fake_quants[0][1])
    assert float(low.min()) < 0 < float(high.max())  # DDP's sync reads and writes these ranges


def test_convert_matches_the_qat_network_and_folds_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    prepared = pt2e.prepare(OwnArgs(), (x,), "x86")
    for _ in range(3):
        prepared(torch.randn(64, 1, 8, 8))
    prepared.eval()
    quantized = pt2e.convert(prepared)
    with torch.no_grad():
        expected, got = prepared(x), quantized(x)
    assert float((got - expected).norm() / expected.norm()) < 0.05
    targets = [str(n.target) for n in quantized.exported.graph.nodes]
    assert not any("batch_norm" in t for t in targets)
    assert pt2e.int8_layers(quantized) == 2
    assert prepared.exported.graph is not quantized.exported.graph  # a copy was converted


def _weights(graph_module: torch.fx.GraphModule, op: str) -> list:
    """The argument after each ``op`` call's input (a weight's fake-quant call, or its dequantize's scale), in order."""
    return [node.args[1] for node in graph_module.graph.nodes if op in str(node.target)]


@pytest.mark.parametrize(
    "backend",
    ["x86", pytest.param("xnnpack", marks=pytest.mark.skipif(xnnpack.missing() is not None, reason="no executorch"))],
)
def test_weights_train_and_convert_on_one_symmetric_grid(digits8, backend):
    """torchao's fused weight fake-quant (torch's kernel) trained a depthwise channel of one sign on an affine grid of
    half the scale (zero point -128 or 127, as ao's did), and convert_pt2e shipped the observer's symmetric one: QAT
    and the artifact had other weights. And every channel converted on ``max|w| / 127.5``, trained on ``/ 127``."""
    torch.manual_seed(0)
    x = digits8.splits["val"].tensors[0]
    prepared = pt2e.prepare(Depthwise(), (x[:2],), backend)
    with torch.no_grad():
        for batch in x[:256].split(64):
            prepared(batch)
    graph_module = prepared.exported
    call = _weights(graph_module, "conv2d")[1]  # depthwise's weight, through its fake-quant
    fake_quant = graph_module.get_submodule(str(call.target))
    weight = graph_module.get_parameter(str(call.args[0].target))
    assert torch.equal(fake_quant.zero_point, torch.zeros(8, dtype=torch.int32))
    peak = weight.detach().abs().amax(dim=(1, 2, 3)).double()
    widened = 255 / 254 if backend == "xnnpack" else 1.0  # [-127, 127]: torch's kernel spreads 255 steps over 254
    for channel in ONE_SIGNED[:2]:  # the scale a two-signed channel of the same range gets
        assert float(fake_quant.scale[channel]) in (
            pytest.approx(float(peak[channel]) / 127 * widened),
            pytest.approx(float(peak[channel]) / 128 * widened),
        )
    prepared.eval()
    quantized = pt2e.convert(prepared)
    scale = _weights(quantized.exported, "dequantize_per_channel")[1]
    assert torch.equal(quantized.exported.get_buffer(str(scale.target)), fake_quant.scale)  # what QAT trained with


def test_the_conversion_cache_wraps_torchao_s_private_for_the_conversion_only():
    from torchao.quantization.pt2e import qat_utils

    original = qat_utils._get_aten_graph_module_for_pattern  # noqa: SLF001 - the canary: renamed upstream, red here
    assert list(inspect.signature(original).parameters)[:3] == ["pattern", "example_inputs", "is_cuda"]
    x = torch.randn(16, 1, 8, 8)
    prepared = pt2e.prepare(TinyNet(), (x,), "x86")
    prepared(x)
    pt2e.convert(prepared.eval())
    assert qat_utils._get_aten_graph_module_for_pattern is original  # noqa: SLF001 - put back after converting
    assert 0 < len(pt2e._PATTERNS) <= pt2e._MOST_PATTERNS  # noqa: SLF001 - bounded


def test_prepare_model_stops_with_the_reason_when_export_fails():
    network = UntraceableNet()
    with pytest.raises(
        RuntimeError, match=r"engine='pt2e' but torch.export cannot capture UntraceableNet .*engine='auto'"
    ):
        prepare_model(network, "x86", "pt2e", [], (torch.randn(4, 1, 8, 8),))


@pytest.mark.parametrize(("skip", "kept"), [("fc2", {"linear": 256 * 10}), ("conv1", {"conv2d": 32 * 9})])
def test_skip_keeps_a_layer_float(skip, kept):
    """A skipped conv with a BatchNorm too (torchao's QAT Conv-BN fusion raised IndexError on its empty annotation)."""
    x = torch.randn(16, 1, 8, 8)
    prepared = pt2e.prepare(TinyNet(), (x,), "x86", skip=[skip])
    prepared(x)
    prepared.eval()
    quantized = pt2e.convert(prepared)
    assert pt2e.int8_layers(quantized) == 3
    assert pt2e.float_parameters(quantized) == kept


def test_multihead_attention_projections_are_int8():
    """torch.export records the F.linear calls inside nn.MultiheadAttention as the module's: marked as linears."""
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=False), 2)
    x = torch.randn(10, 4, 32)  # (sequence, batch, features): the projections read a transposed input
    prepared = pt2e.prepare(encoder, (x,), "x86")
    prepared(x)
    prepared.eval()
    quantized = pt2e.convert(prepared)
    assert pt2e.int8_layers(quantized) == 2 * 4  # in-projection, out-projection and the two feed-forward Linears
    assert pt2e.float_parameters(quantized) == {}
