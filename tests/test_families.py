"""Network families broadly: many timm architectures at small size, prepared and put through the preflight's checks.

No training: what is asserted is that ``engine="auto"`` takes each network and the int8 conversion runs, or that the
network is refused with a clear :class:`~lightning_qat.PreflightError` (the refusals are listed, each with why).
Random weights, 3x32x32 inputs, nothing downloaded.
"""

import copy

import pytest
import torch

from lightning_qat import PreflightError
from lightning_qat.lightning.preflight import check_network
from lightning_qat.quantization import pt2e
from lightning_qat.quantization.edits import linears_from_conv1d
from lightning_qat.quantization.measure import count_weight_layers
from lightning_qat.quantization.prepare import prepare_model

timm = pytest.importorskip("timm")

# timm's test_* models are its own small builds of each family; the rest are the smallest members of theirs.
FX = [
    "test_byobnet",
    "test_coatnet",
    "test_convnext",
    "test_efficientnet",
    "test_efficientnet_evos",
    "test_efficientnet_gn",
    "test_efficientnet_ln",
    "test_mambaout",
    "test_maxvit",
    "test_nfnet",
    "test_resnet",
    "test_vit3",
    "test_vit_relpos",
    "mixnet_s",  # mixed-kernel depthwise convs, then a BatchNormAct2d after their cat (the #38 regression)
    "tf_mixnet_s",
    "resnet10t",
    "resnet18d",
    "seresnet18",
    "resnext26ts",
    "resnest14d",
    "skresnet18",
    "mobilenetv2_035",
    "mobilenetv3_small_050",
    "mobilenetv4_conv_small",
    "efficientnet_lite0",
    "tinynet_e",
    "mnasnet_small",
    "semnasnet_050",
    "fbnetc_100",
    "hardcorenas_a",
    "lcnet_050",
    "ghostnet_050",
    "dla34",
    "dpn48b",  # a BatchNormAct2d no convolution precedes, like mixnet's
    "repvgg_a0",
    "fastvit_t8",
    "ese_vovnet19b_slim",
    "gernet_s",
    "darknet17",
    "cs3darknet_s",
    "nf_resnet26",
    "levit_128s",
    "convnext_atto",
    "convnextv2_atto",
    "pit_ti_224",
    "deit_tiny_patch16_224",
    "botnet26t_256",
    "lambda_resnet26t",
    "fasternet_t0",
    "starnet_s1",
]
# torch.fx cannot trace these (control flow, hybrid conv/attention): "auto" captures them with torch.export (PT2E).
# nest_tiny's drop paths and attention dropout are decided on `self.training` in Python (the capture's train/eval).
PT2E = ["test_vit", "test_vit2", "test_vit4", "twins_svt_small", "nest_tiny"]
# Refused in setup, and why (docs/reliability.md lists them). Measured with timm 1.0.31 on torch 2.14.1 (FX):
# edgenext_xx_small: torch.ao's FX conversion reads `.device` of a weight it has made a method (the positional
# encoding's conv); efficientformerv2_s0: a channels-last `.mean` on a 3-d tensor in torch.ao's lowered graph. With
# timm 1.0.12 on torch 2.4.1 torch.fx cannot trace EdgeNeXt and eager mode meets a BatchNorm on int8 tensors.
REFUSED = ["edgenext_xx_small", "efficientformerv2_s0"]
CONVERSION_FAILS = (
    r"int8 conversion would fail at the end of fit: the int8 model \((fx|eager) mode\) fails on an example"
)


def _network(name: str) -> torch.nn.Module:
    if name not in timm.list_models():
        pytest.skip(f"timm {timm.__version__} has no {name}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=10, img_size=32)
    except TypeError:  # a convolutional family: any input size
        return timm.create_model(name, pretrained=False, num_classes=10)


def _check(name: str) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    net, x = _network(name), (torch.randn(2, 3, 32, 32),)
    reference = copy.deepcopy(net).eval()
    prepared = prepare_model(net, "x86", "auto", [], x, kept={})  # no kernel timing: the same graph on any CPU
    quantized = check_network(reference, prepared, "x86", x, name, export=prepared.engine.formats[:1]).quantized
    with torch.no_grad():
        out = quantized(*x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    assert count_weight_layers(quantized) > 0
    return prepared.mode, quantized


@pytest.mark.parametrize("name", FX)
def test_a_timm_family_fx_traces_converts_to_int8(name):
    assert _check(name)[0] == "fx"


@pytest.mark.skipif(pt2e.missing() is not None, reason=f"PT2E engine: {pt2e.missing()}")
@pytest.mark.parametrize("name", PT2E)
def test_a_timm_family_fx_cannot_trace_is_captured_by_pt2e(name):
    assert _check(name)[0] == "pt2e"


@pytest.mark.parametrize("name", REFUSED)
def test_a_timm_family_that_cannot_convert_is_refused_in_setup_with_why(name):
    with pytest.raises(PreflightError, match=CONVERSION_FAILS):
        _check(name)


# Hugging Face transformers, tiny configs built here (random init, nothing downloaded): text models take 65 token ids
# (the digits' 64 pixels and a class token), image models 1x8x8 digits. torch.fx cannot trace them; "auto" captures
# them with torch.export. name: (config, model, the config's arguments beyond the shared small sizes)
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=10)
TEXT = dict(vocab_size=20, max_position_embeddings=80)
DECODER = TEXT | dict(num_key_value_heads=2, pad_token_id=0)  # grouped-query attention; the pad id ends a sequence
IMAGE = dict(image_size=8, patch_size=2, num_channels=1)
HF = {
    "bert": ("BertConfig", "BertForSequenceClassification", TEXT),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", TEXT | dict(dim=64, hidden_dim=128)),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", TEXT | dict(pad_token_id=1)),  # int position ids
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", TEXT | dict(embedding_size=32)),
    "gpt2": ("GPT2Config", "GPT2ForSequenceClassification", TEXT | dict(pad_token_id=0, n_embd=64, n_layer=2)),
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification", DECODER),
    "mistral": ("MistralConfig", "MistralForSequenceClassification", DECODER),
    "phi": ("PhiConfig", "PhiForSequenceClassification", TEXT | dict(pad_token_id=0)),
    "gemma": ("GemmaConfig", "GemmaForSequenceClassification", DECODER),
    "vit": ("ViTConfig", "ViTForImageClassification", IMAGE),
    "deit": ("DeiTConfig", "DeiTForImageClassification", IMAGE),
}


class Logits(torch.nn.Module):
    """What a LightningModule's ``forward`` around a Hugging Face model returns: ``.logits``."""

    def __init__(self, model: torch.nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.key: x}).logits


@pytest.mark.skipif(pt2e.missing() is not None, reason=f"Hugging Face models need the PT2E engine: {pt2e.missing()}")
@pytest.mark.parametrize("name", list(HF))
def test_a_hugging_face_family_is_captured_by_pt2e_and_converts(name):
    transformers = pytest.importorskip("transformers")
    config, model, extra = HF[name]
    if not hasattr(transformers, model):
        pytest.skip(f"transformers {transformers.__version__} has no {model}")
    torch.manual_seed(0)
    network = getattr(transformers, model)(getattr(transformers, config)(**(SMALL | extra)))
    text = "vocab_size" in extra
    net = Logits(network, "input_ids" if text else "pixel_values")
    x = (torch.randint(2, 17, (4, 65)),) if text else (torch.randn(4, 1, 8, 8),)
    reference = copy.deepcopy(net).eval()
    layers = copy.deepcopy(net)
    linears_from_conv1d(layers)  # GPT-2's Conv1D, as prepare_model swaps them
    weighted = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in layers.modules())
    prepared = prepare_model(net, "x86", "auto", [], x, kept={})
    # the preflight's checks: eval() deterministic (attention dropout decided on self.training), converts, runs
    quantized = check_network(reference, prepared, "x86", x, name, export=prepared.engine.formats[:1]).quantized
    assert prepared.mode == "pt2e"
    with torch.no_grad():
        out = quantized(*x)
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    assert count_weight_layers(quantized) == weighted  # every Linear (attention, MLP, head) and convolution int8


@pytest.mark.skipif(pt2e.missing() is not None, reason=f"Hugging Face models need the PT2E engine: {pt2e.missing()}")
def test_a_decoder_returning_its_key_value_cache_is_refused_naming_use_cache():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(**(SMALL | TEXT | dict(n_embd=64, n_layer=2, pad_token_id=0)))

    class Whole(torch.nn.Module):  # returns the ModelOutput, cache included, as `self.model(**batch)` does
        def __init__(self) -> None:
            super().__init__()
            self.gpt2 = transformers.GPT2ForSequenceClassification(config)

        def forward(self, ids: torch.Tensor):
            return self.gpt2(input_ids=ids)

    with pytest.raises(RuntimeError, match=r"key/value cache: build it with use_cache=False"):
        prepare_model(Whole(), "x86", "pt2e", [], (torch.randint(2, 17, (4, 65)),), kept={})
