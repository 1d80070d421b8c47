import pytest
import torch
import torchvision
from conftest import AtrousNet, IdsFromPixels, SelfFusingNet, ShapeBranch, TinyNet, UntraceableNet
from torch import nn
from torch.ao.nn.intrinsic import qat as nniqat
from torch.utils.flop_counter import FlopCounterMode

import lightning_qat
from lightning_qat.quantization import ao, passes, pt2e
from lightning_qat.quantization.edits import check_skip, replace_relu6
from lightning_qat.quantization.engines import Needs
from lightning_qat.quantization.engines.eager import EagerQATWrapper, find_fusion_groups
from lightning_qat.quantization.prepare import float_modules, prepare_model

EXAMPLE8 = (torch.randn(4, 1, 8, 8),)


def _types(module):
    return {type(m) for m in module.modules()}


def test_fx_resnet18_fuses_and_fake_quantizes_residual_model():
    prepared = prepare_model(
        torchvision.models.resnet18(num_classes=10), "x86", "auto", [], (torch.randn(2, 3, 32, 32),)
    )
    assert prepared.mode == "fx"
    assert nniqat.ConvBnReLU2d in _types(prepared.module)
    assert nniqat.ConvBn2d in _types(prepared.module)  # conv2+bn2 of every block, before the residual add
    assert prepared.num_fused == 20
    assert len(ao.fake_quant_modules(prepared.module)) > 40
    assert prepared.module(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_untraceable_model_falls_back_to_eager_with_discovered_fusion():
    prepared = prepare_model(UntraceableNet(), "x86", "auto", [], EXAMPLE8)
    assert prepared.mode == "eager"
    assert "fx: UntraceableNet cannot be symbolically traced" in prepared.reason
    assert isinstance(prepared.module, EagerQATWrapper)
    inner = prepared.module.module
    assert isinstance(inner.conv1, nniqat.ConvBnReLU2d)
    assert isinstance(inner.conv2, nniqat.ConvBnReLU2d)
    assert isinstance(inner.fc1, nniqat.LinearReLU)
    assert ao.fake_quant_modules(prepared.module)


def test_fx_mode_refuses_untraceable_model():
    with pytest.raises(RuntimeError, match="cannot be symbolically traced"):
        prepare_model(UntraceableNet(), "x86", "fx", [], EXAMPLE8)


def test_eager_uses_the_models_own_fuse_model():
    net = SelfFusingNet()
    prepared = prepare_model(net, "x86", "eager", [], EXAMPLE8)
    assert net.fuse_calls == [True]
    assert isinstance(prepared.module.module.conv1, nniqat.ConvBnReLU2d)
    assert isinstance(prepared.module.module.fc1, torch.ao.nn.qat.Linear)  # not fused: fuse_model did not ask


def test_fusion_discovery_never_fuses_a_shared_relu():
    groups = find_fusion_groups(torchvision.models.resnet18(num_classes=10), (torch.randn(1, 3, 32, 32),))
    flat = [name for group in groups for name in group]
    assert ["conv1", "bn1", "relu"] in groups
    assert "layer1.0.relu" not in flat  # BasicBlock calls self.relu twice
    assert ["layer1.0.conv2", "layer1.0.bn2"] in groups


def test_skip_keeps_modules_float_in_both_modes():
    fx = prepare_model(TinyNet(), "x86", "fx", ["fc2"], EXAMPLE8)
    assert type(fx.module.fc2.module) is torch.nn.Linear
    assert float_modules(fx.module) == ["fc2"]
    eager = prepare_model(UntraceableNet(), "x86", "eager", ["fc2"], EXAMPLE8)
    assert type(eager.module.module.fc2.module) is torch.nn.Linear
    assert float_modules(eager.module) == ["fc2"]


def test_unknown_skip_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"'fc3'.*fc1"):
        check_skip(TinyNet(), ["fc3"])


def test_relu6_to_relu_lets_mobilenet_blocks_fuse_with_their_activation():
    example = (torch.randn(2, 3, 32, 32),)
    kept = prepare_model(torchvision.models.mobilenet_v2(width_mult=0.5), "x86", "fx", [], example)
    swapped = prepare_model(
        torchvision.models.mobilenet_v2(width_mult=0.5), "x86", "fx", ["classifier"], example, relu6_to_relu=True
    )
    assert swapped.relu6_replaced == 35  # 2 per inverted residual block with expansion, + first and last conv
    assert kept.relu6_replaced == 0
    assert torch.nn.ReLU6 not in _types(swapped.module)
    assert sum(isinstance(m, nniqat.ConvBnReLU2d) for m in swapped.module.modules()) == 35
    assert sum(isinstance(m, nniqat.ConvBnReLU2d) for m in kept.module.modules()) == 0
    assert len(ao.fake_quant_modules(swapped.module)) < len(ao.fake_quant_modules(kept.module))


def test_replace_relu6_leaves_skipped_submodules_alone():
    net = torch.nn.Sequential(torch.nn.ReLU6(), torch.nn.Sequential(torch.nn.ReLU6()))
    assert replace_relu6(net, skip=["1"]) == 1
    assert [type(m) for m in (net[0], net[1][0])] == [torch.nn.ReLU, torch.nn.ReLU6]


class StochasticBlock(torch.nn.Module):
    """Stochastic depth as torchvision's networks use it (a module) and a functional dropout on self.training."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.drop_path = torchvision.ops.StochasticDepth(0.5, "row")
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = x + self.drop_path(self.conv2(x))
        x = torch.nn.functional.dropout(x, 0.3, self.training)
        return self.fc(x.mean((2, 3)))


def test_dropout_and_stochastic_depth_follow_train_and_eval_in_qat_int8_and_artifact(tmp_path):
    from lightning_qat.export.torchscript import save_torchscript
    from lightning_qat.quantization.convert import to_int8

    x = torch.randn(16, 3, 8, 8)
    prepared = prepare_model(StochasticBlock(), "x86", "fx", [], (x,)).module
    with torch.no_grad():
        prepared.train()
        assert not torch.equal(prepared(x), prepared(x))  # training: random, as in float
        ao.set_observers(prepared, False)
        prepared.eval()
        assert torch.equal(prepared(x), prepared(x))
    int8 = to_int8(prepared, "fx", "x86", (x,))
    artifact = save_torchscript(int8, tmp_path / "m.pt", "x86", (x,))
    with torch.no_grad(), ao.quiet():
        assert torch.equal(int8(x), int8(x))
        assert torch.equal(lightning_qat.load_quantized(artifact)(x), int8(x))


def test_integer_tensors_computed_in_the_graph_are_not_fake_quantized():
    x = torch.rand(4, 1, 8, 8) * 4
    prepared = prepare_model(IdsFromPixels(), "x86", "fx", [], (x,))
    with torch.no_grad(), ao.quiet():
        prepared.module(x)  # a float-only fake-quant on the ids fails here with a dtype error
        int8 = ao.convert_fx(prepared.module.eval())
        assert int8(x).shape == (4, 10)
    assert any(ao.is_quantized_module(m) and isinstance(m, torch.ao.nn.quantized.Embedding) for m in int8.modules())


def test_an_example_batch_of_one_still_prepares_in_fx_mode():
    prepared = prepare_model(torchvision.models.resnet18(weights=None), "x86", "auto", [], (torch.randn(1, 3, 32, 32),))
    assert prepared.mode == "fx", prepared.reason


def test_the_fake_quants_dropped_from_integer_tensors_are_gone():
    """A fake-quant no node calls would never see data, and the conversion refuses uncalibrated observers."""
    prepared = prepare_model(IdsFromPixels(), "x86", "fx", [], EXAMPLE8).module
    called = {id(prepared.get_submodule(str(n.target))) for n in prepared.graph.nodes if n.op == "call_module"}
    activations = [(name, fq) for name, fq in ao.fake_quant_modules(prepared) if "." not in name]  # graph nodes call
    assert activations  # the float input and the embedding's output still are quantized
    assert [name for name, fq in activations if id(fq) not in called] == []


@pytest.mark.parametrize("mode", ["fx", "eager"])
def test_a_batchnorm_initialised_to_zero_trains_without_nan(mode):
    """torchvision's zero_init_residual (timm's zero_init_last): torch's fused Conv-BN QAT divides by the BN weight."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10, zero_init_residual=True)
    reference = torchvision.models.resnet18(num_classes=10, zero_init_residual=True)
    reference.load_state_dict(net.state_dict())
    x = torch.randn(4, 3, 32, 32)
    result = prepare_model(net, "x86", mode, [], (x[:2],))
    assert any("1920 BatchNorm weights were exactly 0" in w for w in result.warnings)  # bn2 of 8 blocks
    prepared = result.module.eval()
    prepared.apply(torch.ao.quantization.disable_fake_quant)
    with torch.no_grad():  # the float network's function, but for 1e-4 of the normalized activation on those channels
        assert (prepared(x) - reference.eval()(x)).abs().max() <= 1e-3
    prepared.apply(torch.ao.quantization.enable_fake_quant)
    loss = prepared.train()(x).logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in prepared.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", ["fx", "eager"])
@pytest.mark.parametrize("slowdown", [1.0, 100.0])
def test_a_depthwise_conv_stays_float_where_the_int8_kernel_for_its_shape_is_slow(monkeypatch, digits8, mode, slowdown):
    """x86 and fbgemm have no dilated depthwise int8 kernel: 110x slower than float here, LR-ASPP 0.23x as fast."""
    from lightning_qat.quantization.convert import to_int8

    monkeypatch.setattr(ao, "depthwise_slowdown", lambda backend, shape: slowdown if shape[3] == (2, 2) else 1.0)
    torch.manual_seed(0)
    x = digits8.splits["train"].tensors[0][:64]
    prepared = prepare_model(AtrousNet(), "x86", mode, [], (x[:2],))
    slow = slowdown > 8
    assert list(prepared.kept_float) == (["atrous.0"] if slow else [])
    said = [w for w in prepared.warnings if "1 depthwise convolutions stay float" in w]
    assert len(said) == slow
    assert not said or "atrous.0 (3x3, stride 1, padding 2, dilation 2)" in said[0]
    with torch.no_grad(), ao.quiet():
        prepared.module(x)  # calibrate
    qat_net = prepared.module.eval()
    int8 = to_int8(qat_net, prepared.mode, "x86", (x[:2],))
    int8_convs = {name for name, m in int8.named_modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)}
    assert any("plain" in name for name in int8_convs)
    assert any("atrous" in name for name in int8_convs) == (not slow)
    with torch.no_grad(), ao.quiet(), ao.engine("x86"):
        expected, actual = qat_net(x), int8(x)
    assert (actual - expected).abs().mean() <= 0.05 * expected.abs().mean()  # the float layer sits between int8 ones


class ClassToken(nn.Module):
    """A class token expanded to the batch and put before the patches (ViT, DeiT): FX observes the expanded view."""

    def __init__(self):
        super().__init__()
        self.patches = nn.Linear(8, 16)
        self.token = nn.Parameter(torch.randn(1, 1, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.patches(x.flatten(1, 2))
        tokens = torch.cat([self.token.expand(tokens.shape[0], -1, -1), tokens], 1)
        return self.fc(tokens[:, 0])


def test_a_parameter_view_gets_a_copy_so_lightning_s_flop_count_works():
    x = torch.randn(4, 1, 8, 8)
    prepared = prepare_model(ClassToken(), "x86", "fx", [], (x,)).module
    assert "clone" in prepared.code
    with torch.no_grad(), FlopCounterMode(display=False):  # what Lightning's model summary runs
        prepared.eval()(x)


def test_the_inputs_of_a_cat_share_one_quantizer_so_int8_cat_keeps_every_input(recwarn):
    """torch's int8 cat takes its first input's scale: a class token with a scale of its own clipped the patches."""
    from zoo import TorchvisionViT

    from lightning_qat.quantization.convert import to_int8

    x = torch.randn(64, 1, 8, 8)
    prepared = prepare_model(TorchvisionViT(), "x86", "fx", [], (x[:2],)).module
    with torch.no_grad():
        prepared(x)
    int8 = to_int8(prepared.eval(), "fx", "x86", (x[:2],))
    with torch.no_grad():
        int8(x)
    assert not [w for w in recwarn if "must share the same quantization parameters" in str(w.message)]
    cat = next(n for n in int8.graph.nodes if n.target is torch.cat)
    token = cat.args[0][0]  # quantize_per_tensor(class token, scale, zero point)
    assert float(getattr(int8, token.args[1].target)) == int8.vit.conv_proj.scale  # the patches' scale


def test_a_failure_of_our_own_fx_passes_is_raised_with_the_network_as_it_was(monkeypatch):
    """Only what torch.fx cannot trace goes to eager mode: a bug in a pass after tracing must not hide there."""

    def broken(graph_module):
        raise KeyError("a bug in a pass")

    monkeypatch.setattr(passes, "share_cat_quantizers", broken)
    net = TinyNet()
    before = [(name, type(module)) for name, module in net.named_modules()]
    with pytest.raises(KeyError, match="a bug in a pass"):
        prepare_model(net, "x86", "auto", ["fc2"], EXAMPLE8)  # skip: an Unfused wrapper to take out again
    assert [(name, type(module)) for name, module in net.named_modules()] == before


def test_what_neither_fx_nor_torch_export_can_take_goes_to_eager_mode():
    prepared = prepare_model(UntraceableNet(), "x86", "auto", [], EXAMPLE8)
    assert prepared.mode == "eager"
    assert prepared.reason.startswith("fx: UntraceableNet cannot be symbolically traced (TraceError: ")
    if pt2e.missing() is None:  # data-dependent control flow: torch.export cannot capture it either
        assert "; pt2e: torch.export cannot capture UntraceableNet" in prepared.reason
    else:  # torchao or a recent enough torch missing: passed over, saying why
        assert f"; pt2e: engine='pt2e' cannot run: {pt2e.missing()}" in prepared.reason


@pytest.mark.skipif(pt2e.missing() is not None, reason=f"PT2E engine: {pt2e.missing()}")
def test_auto_takes_pt2e_for_what_fx_cannot_trace_unless_the_run_needs_what_pt2e_lacks():
    """Before: eager, which fails on hybrid conv/attention networks (timm's ViTs: tests/test_families.py)."""
    prepared = prepare_model(ShapeBranch(), "x86", "auto", [], EXAMPLE8)
    assert prepared.mode == "pt2e"
    assert prepared.activations == "static"
    assert prepared.reason.startswith("fx: ShapeBranch cannot be symbolically traced")
    dynamic = prepare_model(ShapeBranch(), "x86", "auto", [], EXAMPLE8, needs=Needs(dynamic=True))
    assert dynamic.mode == "pt2e"
    assert dynamic.activations == "dynamic"  # captured so: Linears with per-batch activation fake-quant
    searched = prepare_model(ShapeBranch(), "x86", "auto", [], EXAMPLE8, needs=Needs(search=True))
    assert searched.mode == "pt2e"  # its fallback keeps groups of static int8 float
    for needs, why in [
        (Needs(formats=("torchscript",)), "it does not write ['torchscript']"),
        (Needs(dynamic=True, search=True), "the accuracy-budget search cannot keep its layers float"),
    ]:
        prepared = prepare_model(ShapeBranch(), "x86", "auto", [], EXAMPLE8, needs=needs)
        assert prepared.mode == "eager"
        assert prepared.reason.endswith(f"; pt2e: {why}")
    prepared = prepare_model(ShapeBranch(), "qnnpack", "auto", [], EXAMPLE8)
    assert prepared.mode == "eager"
    assert prepared.reason.startswith("fx: ")
    assert "pt2e" not in prepared.reason  # torchao's quantizers here are x86's: no candidate for qnnpack
