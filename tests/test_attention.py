"""torch's attention modules rewritten for FX quantization: the same function, every projection an int8 Linear."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import BoringClassifier, trainer_kwargs
from torch import nn
from zoo import PaddedTokenClassifier, TextEncoder, TorchvisionSwin, TorchvisionViT, to_padded_ids

from lightning_qat import QATCallback, load_quantized
from lightning_qat.quantization import ao
from lightning_qat.quantization.attention import Attention, WindowAttention, decompose_attention, restore
from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.measure import float_parameters
from lightning_qat.quantization.prepare import prepare_model

CALLS = {
    "weights": {},
    "no weights": {"need_weights": False},
    "per-head weights": {"average_attn_weights": False},
    "key padding": {"key_padding_mask": "padding"},
    "bool causal mask": {"attn_mask": "causal", "need_weights": False},
    "float mask + padding": {"attn_mask": "float", "key_padding_mask": "padding"},
    "causal hint + mask": {"attn_mask": "causal", "is_causal": True, "need_weights": False},
}


def _masks(kwargs, batch, length):
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[:, -2:] = True
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    values = {"padding": padding, "causal": causal, "float": torch.randn(length, length)}
    return {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_computes_what_multihead_attention_computes(call, batch_first, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, bias=bias, batch_first=batch_first).eval()
    attention = Attention(copy.deepcopy(mha)).eval()
    x, memory = torch.randn(3, 7, 32), torch.randn(3, 7, 32)
    if not batch_first:
        x, memory = x.transpose(0, 1), memory.transpose(0, 1)
    kwargs = _masks(CALLS[call], 3, 7)
    for key, value in ((x, x), (memory, memory)):  # self-attention (one int8 in_proj) and cross-attention
        expected, expected_weights = mha(x, key, value, **kwargs)
        out, weights = attention(x, key, value, **kwargs)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        assert (weights is None) == (expected_weights is None)
        if weights is not None:
            torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_a_decomposed_transformer_encoder_computes_what_torch_s_computes(norm_first, activation):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=norm_first, activation=activation)
    encoder = nn.Sequential(nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False))
    decomposed = copy.deepcopy(encoder)
    replaced, left = decompose_attention(decomposed)
    assert sorted(replaced) == ["0", "0.layers.0", "0.layers.0.self_attn", "0.layers.1", "0.layers.1.self_attn"]
    assert left == {}
    assert decomposed.state_dict().keys() != encoder.state_dict().keys()  # in_proj.weight for in_proj_weight
    x = torch.randn(3, 7, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[:, -2:] = True
    with torch.no_grad():  # eval: torch's own runs its fused fast path, which bypasses its Linear modules
        expected = encoder.eval()[0](x, src_key_padding_mask=padding)[:, :5]
        torch.testing.assert_close(decomposed.eval()[0](x, src_key_padding_mask=padding)[:, :5], expected)
    restore(decomposed, replaced)
    assert decomposed.state_dict().keys() == encoder.state_dict().keys()


@pytest.mark.parametrize("size", [8, 6])  # 6: windows of 2 over 3x3 patches, padded
def test_swin_window_attention_computes_what_torchvision_s_computes(size):
    torch.manual_seed(0)
    swin = TorchvisionSwin().eval()
    decomposed = copy.deepcopy(swin)
    replaced, _ = decompose_attention(decomposed)
    assert len(replaced) == 4
    assert all(isinstance(decomposed.get_submodule(name), WindowAttention) for name in replaced)
    assert decomposed.state_dict().keys() == swin.state_dict().keys()  # same names, same tensors
    x = torch.randn(4, 1, size, size)
    with torch.no_grad():
        torch.testing.assert_close(decomposed(x), swin(x))


def test_attention_that_cannot_be_decomposed_stays_float_and_says_why():
    net = nn.ModuleDict({"kv": nn.MultiheadAttention(32, 4, kdim=16, vdim=16), "bias": nn.MultiheadAttention(32, 4)})
    net["bias2"] = nn.MultiheadAttention(32, 4, add_bias_kv=True)
    replaced, left = decompose_attention(net)
    assert sorted(replaced) == ["bias"]
    assert set(left) == {"kv", "bias2"}
    assert "kdim/vdim" in left["kv"]
    assert "add_bias_kv" in left["bias2"]
    assert isinstance(net["kv"], nn.MultiheadAttention)
    assert isinstance(net["bias"], Attention)


def test_every_projection_of_a_vision_transformer_is_int8(digits8):
    """Left float: the class token and the positional embedding; every Linear, the patch conv (and LayerNorm) int8."""
    x, _ = digits8.splits["train"].tensors
    prepared = prepare_model(TorchvisionViT(), "x86", "auto", [], (x[:2],))
    assert (prepared.mode, prepared.attention) == ("fx", 2)
    with torch.no_grad():
        prepared.module(x[:64])
    int8 = to_int8(prepared.module.eval(), "fx", "x86", (x[:2],))
    left = float_parameters(int8)
    assert set(left) <= {"LayerNorm", "Module"}, left  # Module: FX's container of the class token and the positions
    total = sum(p.numel() for p in TorchvisionViT().parameters())
    assert sum(left.values()) / total < 0.05


def test_every_projection_of_a_swin_is_int8(digits8):
    x, _ = digits8.splits["train"].tensors
    prepared = prepare_model(TorchvisionSwin(), "x86", "fx", [], (x[:2],))
    with torch.no_grad():
        prepared.module(x[:64])
    left = float_parameters(to_int8(prepared.module.eval(), "fx", "x86", (x[:2],)))
    assert set(left) <= {"LayerNorm", "Module"}, left  # Module: the relative position bias tables


def test_attention_dropout_follows_train_and_eval_after_tracing(digits8):
    """The attention core is a leaf: traced in training mode, its dropout still switches off in eval."""
    x, _ = digits8.splits["train"].tensors
    net = TextEncoder()
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # only the attention's own dropout left
    prepared = prepare_model(net, "x86", "fx", [], (to_padded_ids(x[:2]),)).module
    prepared.apply(torch.ao.quantization.disable_fake_quant)
    ids = to_padded_ids(x[:16])
    with torch.no_grad():
        assert not torch.equal(prepared.train()(ids), prepared(ids))  # dropout 0.1 in the attention weights
        assert torch.equal(prepared.eval()(ids), prepared(ids))


def test_a_text_encoder_artifact_takes_other_sequence_lengths(tmp_path, digits8):
    pl.seed_everything(0)
    qat = QATCallback(interval="step", freeze_bn_after=2, freeze_observers_after=4, evaluate=None, activations="static")
    model = PaddedTokenClassifier(TextEncoder())
    pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=[qat])).fit(model, datamodule=digits8)
    assert qat.report.attention == 2
    assert qat.report.mode == "fx"
    x, _ = digits8.splits["val"].tensors
    ids = to_padded_ids(x[:32])[:, :40].contiguous()  # 40 tokens, the example had 64 (int8 embeddings: contiguous)
    artifact = load_quantized(qat.artifact_path)
    with torch.no_grad(), ao.quiet():
        torch.testing.assert_close(artifact(ids), qat.quantized_model(ids))
        assert artifact(ids).shape == (32, 10)


def test_a_multihead_attention_network_trains_in_fx_with_its_projections_quantized(tmp_path, digits8):
    pl.seed_everything(0)
    qat = QATCallback(interval="step", freeze_bn_after=2, freeze_observers_after=4, latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=[qat]))
    trainer.fit(BoringClassifier(TorchvisionViT()), datamodule=digits8)
    assert qat.report.attention == 2
    assert "MultiheadAttention" not in qat.report.float_params
    assert any("nn.MultiheadAttention modules are int8 Linears" in line for line in qat.report.summary())


def test_lightning_s_model_summary_counts_the_flops_of_a_qat_vision_transformer(tmp_path, digits8):
    """With an example_input_array, the summary runs torch's FlopCounterMode: the class token's fake-quant broke it."""
    model = BoringClassifier(TorchvisionViT())
    model.example_input_array = torch.zeros(2, 1, 8, 8)
    qat = QATCallback(interval="step", freeze_bn_after=1, freeze_observers_after=2, evaluate=None, latency_repeats=1)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[qat], enable_model_summary=True))
    trainer.fit(model, datamodule=digits8)
    assert qat.report is not None


class AttentionPool(nn.Module):
    """A learned query attends over the patches: cross-attention, sequence-first."""

    def __init__(self):
        super().__init__()
        self.patch, self.query = nn.Conv2d(1, 32, 2, 2), nn.Parameter(torch.randn(1, 1, 32) * 0.1)
        self.attn, self.fc = nn.MultiheadAttention(32, 4), nn.Linear(32, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).permute(2, 0, 1)
        return self.fc(self.attn(self.query.expand(1, x.shape[0], -1), tokens, tokens)[0][0])


def test_cross_attention_projects_with_three_int8_linears(digits8):
    x, _ = digits8.splits["train"].tensors
    prepared = prepare_model(AttentionPool(), "x86", "fx", [], (x[:2],)).module
    with torch.no_grad():
        prepared(x[:64])
    int8 = to_int8(prepared.eval(), "fx", "x86", (x[:2],))
    linears = [n for n in int8.graph.nodes if n.target is torch.ops.quantized.linear]
    assert len(linears) == 3  # query, key, value: slices of in_proj (out_proj and fc are int8 modules)
    assert float_parameters(int8) == {"GraphModule": 32}  # only the query token stays float
