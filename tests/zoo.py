"""The zoo of network shapes users bring: each network, the LightningModule it trains in, its input and tolerances."""

import warnings

import pytest
import torch
import torchvision
from conftest import BoringClassifier, NormActNet, TinyNet, UntraceableNet
from packaging.version import Version
from torch import nn


class LinearBnMLP(nn.Module):
    """Linear-BatchNorm1d-ReLU blocks (FX fuses them into LinearBn1d)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn1, self.relu1 = nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(self.relu1(self.bn1(self.fc1(x.flatten(1)))))


class StandaloneBn(nn.Module):
    """A BatchNorm no conv precedes (after a residual add): it stays a BatchNorm of its own."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn(x + self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Conv1dNet(nn.Module):
    """The image read as a 1-channel sequence of 64 values."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.relu(self.bn(self.conv(x.flatten(1).unsqueeze(1)))).mean(2))


class StochasticNet(nn.Module):
    """Stochastic depth (as torchvision's networks use it) and a functional dropout on self.training."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.drop_path = torchvision.ops.StochasticDepth(0.2, "row")
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = x + self.drop_path(self.conv2(x))
        return self.fc(nn.functional.dropout(x.mean((2, 3)), 0.1, self.training))


class NormGeluBlock(nn.Module):
    """LayerNorm and GELU, which stay float, around quantized Linears."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.norm(self.fc1(x.flatten(1)))))


class SharedConv(nn.Module):
    """One Conv2d called twice, each call followed by its own BatchNorm: FX must not fuse bn1 into both."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn1(self.conv(x))) + torch.relu(self.bn2(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class SharedBlock(nn.Module):
    """A Conv-BN-ReLU block called twice: it stays float as a whole (FX would fuse its members apart)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.block(self.block(torch.relu(self.stem(x)))).mean((2, 3)))


class WeightNormNet(nn.Module):
    """Weight-normalized convolutions (the parametrization and the older hook), folded for QAT."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.utils.parametrizations.weight_norm(nn.Conv2d(1, 16, 3, padding=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based form
            self.conv2 = nn.utils.weight_norm(nn.Conv2d(16, 16, 3, padding=1, stride=2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def to_token_ids(x):
    """The 17 grey levels of the digits' pixels as token ids (integer input of shape (N, 64))."""
    return ((x * 0.4 + 0.3) * 16).round().clamp(0, 16).long().flatten(1)


class TokenNet(nn.Module):
    """Token ids (int64) through an Embedding and a Linear: the integer input must never be fake-quantized."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(17, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, ids):
        return self.fc(self.embedding(ids).mean(1))


class TokenClassifier(BoringClassifier):
    """Feeds the network token ids made from the images; tells QAT its input with `example_input_array`."""

    def __init__(self, net):
        super().__init__(net)
        self.example_input_array = torch.randint(0, 17, (2, 64))

    def forward(self, x):
        return self.net(to_token_ids(x))


def meta_features(x):
    """Per-row means of the image: the "metadata" second input (N, 8), float."""
    return x.flatten(2).mean(1).reshape(-1, 8, 8).mean(2)


class ImageAndMeta(nn.Module):
    """Two positional inputs, and a submodule called `meta` (FX's GraphModule has a `meta` attribute of its own)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.meta = nn.Linear(8, 16)
        self.fc = nn.Linear(32, 10)

    def forward(self, image, meta):
        pooled = torch.relu(self.bn(self.conv(image))).mean((2, 3))
        return self.fc(torch.cat([pooled, torch.relu(self.meta(meta))], 1))


class TwoInputClassifier(BoringClassifier):
    def __init__(self, net):
        super().__init__(net)
        self.example_input_array = (torch.zeros(2, 1, 8, 8), torch.zeros(2, 8))

    def forward(self, x):
        return self.net(x, meta_features(x))


class DictInOut(nn.Module):
    """A dict in (`{"image": ...}`), a dict out (`{"logits": ..., "features": ...}`)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, batch):
        features = torch.relu(self.bn(self.conv(batch["image"]))).mean((2, 3))
        return {"logits": self.fc(features), "features": features}


class DictClassifier(BoringClassifier):
    def __init__(self, net):
        super().__init__(net)
        self.example_input_array = ({"image": torch.zeros(2, 1, 8, 8)},)

    def forward(self, x):
        return self.net({"image": x})["logits"]


class Decoder(nn.Module):
    """A ConvTranspose2d upsampling path (per-tensor int8 weights: no per-channel transposed-conv kernels)."""

    def __init__(self):
        super().__init__()
        self.down, self.bn = nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.up(torch.relu(self.bn(self.down(x))))).flatten(1))


class TorchvisionConvNeXt(nn.Module):
    """torchvision's ConvNeXt (stochastic depth, LayerNorm2d, GELU, layer scale), two tiny stages."""

    def __init__(self):
        super().__init__()
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        blocks = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
        self.convnext = ConvNeXt(blocks, stochastic_depth_prob=0.3, num_classes=10)

    def forward(self, x):
        return self.convnext(x.expand(-1, 3, -1, -1))


class Timm(nn.Module):
    """A timm network (random weights, nothing downloaded) on the 1x8x8 digits, resized where it needs more pixels."""

    def __init__(self, name: str, size: int = 8, **kwargs) -> None:
        super().__init__()
        timm = pytest.importorskip("timm")
        self.size = size
        self.net = timm.create_model(name, pretrained=False, num_classes=10, in_chans=1, **kwargs)

    def forward(self, x):
        if self.size != 8:  # decided at construction: a condition on x.shape would not trace
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x)


class TorchvisionViT(nn.Module):
    """torchvision's VisionTransformer (nn.MultiheadAttention in every block), 2x2 patches of the digits."""

    def __init__(self):
        super().__init__()
        self.vit = torchvision.models.VisionTransformer(
            image_size=8, patch_size=2, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        )

    def forward(self, x):
        return self.vit(x.expand(-1, 3, -1, -1))


class TorchvisionSwin(nn.Module):
    """torchvision's Swin (shifted windows; qkv / proj Linears torchvision calls through a function), 2 stages."""

    def __init__(self):
        super().__init__()
        self.swin = torchvision.models.SwinTransformer(
            patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2], num_classes=10
        )

    def forward(self, x):
        return self.swin(x.expand(-1, 3, -1, -1))


class TextEncoder(nn.Module):
    """Token ids through nn.TransformerEncoder with a padding mask (id 0), any sequence length up to 64."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(18, 32, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(1, 64, 32))
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, ids):
        padding = ids == 0
        x = self.embedding(ids) + self.position[:, : ids.shape[1]]
        return self.fc(self.encoder(x, src_key_padding_mask=padding).mean(1))


def to_padded_ids(x):
    """The digits' pixels as ids 1..17 (grey levels), the last row padding (id 0): (N, 64) int64."""
    ids = to_token_ids(x) + 1
    ids[:, 56:] = 0
    return ids


class PaddedTokenClassifier(BoringClassifier):
    def __init__(self, net):
        super().__init__(net)
        self.example_input_array = to_padded_ids(torch.zeros(2, 1, 8, 8))

    def forward(self, x):
        return self.net(to_padded_ids(x))


# Hugging Face transformers, tiny configs built here (random init, nothing downloaded). torch.fx cannot trace them:
# engine="auto" captures them with torch.export (PT2E).
HF_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=10)


def _hf(config: str, model: str, **kwargs):
    transformers = pytest.importorskip("transformers")
    try:  # transformers 5.0's models need a newer torch than the oldest set's 2.4 (torch.int1)
        network, settings = getattr(transformers, model), getattr(transformers, config)
    except ImportError as err:
        pytest.skip(f"transformers {transformers.__version__} cannot build {model} on torch {torch.__version__}: {err}")
    torch.manual_seed(0)
    return network(settings(**(HF_SMALL | kwargs)))


class HFEncoder(nn.Module):
    """BERT for sequence classification on token ids and an attention mask; returns `.logits`."""

    def __init__(self):
        super().__init__()
        self.bert = _hf("BertConfig", "BertForSequenceClassification", vocab_size=20, max_position_embeddings=80)

    def forward(self, ids, mask):
        return self.bert(input_ids=ids, attention_mask=mask).logits


class HFDecoder(nn.Module):
    """Llama (grouped-query attention, RoPE, RMSNorm, SiLU gates) for sequence classification; returns its
    ModelOutput, as `self.model(**batch)` in a LightningModule would (without the key/value cache)."""

    def __init__(self):
        super().__init__()
        self.llama = _hf(
            "LlamaConfig",
            "LlamaForSequenceClassification",
            vocab_size=20,
            max_position_embeddings=80,
            num_key_value_heads=2,
            pad_token_id=0,
            use_cache=False,
        )

    def forward(self, ids, mask):
        return self.llama(input_ids=ids, attention_mask=mask)


class HFViT(nn.Module):
    """ViT for image classification on 2x2 patches of the digits; returns `.logits`."""

    def __init__(self):
        super().__init__()
        self.vit = _hf("ViTConfig", "ViTForImageClassification", image_size=8, patch_size=2, num_channels=1)

    def forward(self, x):
        return self.vit(pixel_values=x).logits


def to_ids_and_mask(x):
    """The digits as 65 token ids (a class id 18, then the pixels as ids 1..17) and an attention mask.

    Every fourth image has its last 16 positions padded (id 0, mask 0): batches mix lengths, as a tokenizer pads them.
    """
    ids = torch.cat([torch.full((len(x), 1), 18), to_token_ids(x) + 1], 1)
    mask = torch.ones_like(ids)
    mask[::4, -16:] = 0
    return ids * mask, mask


class IdsAndMaskClassifier(BoringClassifier):
    def __init__(self, net):
        super().__init__(net)
        self.example_input_array = to_ids_and_mask(torch.zeros(4, 1, 8, 8))

    def forward(self, x):
        out = self.net(*to_ids_and_mask(x))
        return out["logits"] if isinstance(out, dict) else out


CLASSIFIER = {  # the others: BoringClassifier, images in
    "token ids + embedding": TokenClassifier,
    "token ids + embedding (eager)": TokenClassifier,
    "text encoder (nn.TransformerEncoder, padding mask)": PaddedTokenClassifier,
    "two inputs (image + meta)": TwoInputClassifier,
    "two inputs (eager)": TwoInputClassifier,
    "dict in, dict out": DictClassifier,
    "dict in, dict out (eager)": DictClassifier,
    "hugging face bert (attention mask)": IdsAndMaskClassifier,
    "hugging face llama (ModelOutput out)": IdsAndMaskClassifier,
}
NETWORK_INPUT = {  # the network's positional inputs made from images
    "token ids + embedding": lambda x: (to_token_ids(x),),
    "token ids + embedding (eager)": lambda x: (to_token_ids(x),),
    "text encoder (nn.TransformerEncoder, padding mask)": lambda x: (to_padded_ids(x),),
    "two inputs (image + meta)": lambda x: (x, meta_features(x)),
    "two inputs (eager)": lambda x: (x, meta_features(x)),
    "dict in, dict out": lambda x: ({"image": x},),
    "dict in, dict out (eager)": lambda x: ({"image": x},),
    "hugging face bert (attention mask)": to_ids_and_mask,
    "hugging face llama (ModelOutput out)": to_ids_and_mask,
}
# Eager mode computes `.mean()` of the int8 conv output in int8 at that output's scale, where the fake-quant network
# averages in float (eager mode observes module outputs only; FX also observes the mean): measured 9.6% / 9.5% relative
# error and 87% / 87% top-1 agreement on torch 2.14.1 / 2.4.1 (FX: 2.7% / 2.7%, 95% / 96%). With the division of a
# learning Conv-BN on its weight (ao.conv_bn: the same function, rounded otherwise) 9.5% and 84.8% on torch 2.14.1,
# against 9.8% and 88.2% with torch's forward in the same code: the error holds, the argmax of near-tied logits moves.
# The eager token network averages its quantized embedding output the same way: measured 6.3% on torch 2.14.1.
# timm's mobilenetv3 and regnety were 18.7% / 77.8% and 7.2% / 97.4% while torch converted weights with another scale
# than its fake-quant trained with (ao.WeightFakeQuantize); now 0.0% / 100% both.
TOLERANCE = {
    "dict in, dict out (eager)": (0.12, 0.8),
    "token ids + embedding (eager)": (0.12, 0.85),
}
# The worst layer's group kept float against the QAT network with those fake-quants off: 0-4.4% over the zoo on torch
# 2.14.1. On torch 2.4.1 the ViT's is far off, by which group the short training leaves worst: 13.0% (an in-projection
# with its attention core) and 22.6% (conv_proj with the class-token cat) measured; torch 2.4.1's FX conversion of
# those groups, not investigated (the fallback search evaluates the real int8 model, so its metric stays right).
KEPT_FLOAT_TOLERANCE = (
    {"torchvision vit (nn.MultiheadAttention)": 0.3} if Version(torch.__version__) < Version("2.5") else {}
)
LOGITS = {
    "dict in, dict out": lambda out: out["logits"],
    "dict in, dict out (eager)": lambda out: out["logits"],
    "hugging face llama (ModelOutput out)": lambda out: out["logits"],  # a ModelOutput, or the artifact's dict
}
MODE = {
    "token ids + embedding (eager)": "eager",
    "two inputs (eager)": "eager",
    "dict in, dict out (eager)": "eager",
    "convtranspose decoder (eager)": "eager",
}
# What mode="auto" (or the MODE above) must end in, for every shape: FX unless tracing cannot work.
EAGER = {
    "untraceable cnn (eager)",  # data-dependent control flow
    "two inputs (image + meta)",  # a submodule named `meta` collides with GraphModule.meta
    *MODE,
}
HUGGING_FACE = {  # engine="auto" captures these with torch.export (torch.fx cannot trace them)
    "hugging face bert (attention mask)",
    "hugging face llama (ModelOutput out)",
    "hugging face vit",
}

ZOO = {
    "token ids + embedding": TokenNet,
    "token ids + embedding (eager)": TokenNet,
    "shared conv": SharedConv,
    "shared conv-bn-relu block": SharedBlock,
    "weight-norm convs": WeightNormNet,
    "cnn": TinyNet,
    "untraceable cnn (eager)": UntraceableNet,
    "linear-bn1d mlp": LinearBnMLP,
    "standalone bn": StandaloneBn,
    "conv1d": Conv1dNet,
    "stochastic depth + dropout": StochasticNet,
    "layernorm + gelu": NormGeluBlock,
    "two inputs (image + meta)": ImageAndMeta,
    "two inputs (eager)": ImageAndMeta,
    "dict in, dict out": DictInOut,
    "dict in, dict out (eager)": DictInOut,
    "convtranspose decoder": Decoder,
    "convtranspose decoder (eager)": Decoder,
    "torchvision convnext (stochastic depth)": TorchvisionConvNeXt,
    "timm-style BatchNormAct2d": NormActNet,
    "timm resnet": lambda: Timm("test_resnet"),
    "timm efficientnet (BatchNormAct2d, squeeze-excite)": lambda: Timm("test_efficientnet"),
    "timm mobilenetv3 (hard-swish, hard-sigmoid gates)": lambda: Timm("mobilenetv3_small_050"),
    "timm regnety": lambda: Timm("regnety_002"),
    "timm convnext (LayerNorm2d, GELU)": lambda: Timm("test_convnext", size=32),
    "torchvision vit (nn.MultiheadAttention)": TorchvisionViT,
    "text encoder (nn.TransformerEncoder, padding mask)": TextEncoder,
    "torchvision swin (shifted window attention)": TorchvisionSwin,
    "timm deit (Linear + scaled_dot_product_attention)": lambda: Timm(
        "deit_tiny_patch16_224", img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2
    ),
    "hugging face bert (attention mask)": HFEncoder,
    "hugging face llama (ModelOutput out)": HFDecoder,
    "hugging face vit": HFViT,
    "timm swin (window attention)": lambda: Timm(
        "swin_tiny_patch4_window7_224",
        img_size=8,
        patch_size=2,
        window_size=2,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(2, 2),
    ),
}
