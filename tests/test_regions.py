"""Which ops of a converted PT2E graph the report says compute in float, and which in int8."""

import pytest
import torch
from torch import nn

from lightning_qat.quantization import pt2e, regions

pytestmark = pytest.mark.skipif(pt2e.missing() is not None, reason=f"PT2E engine: {pt2e.missing()}")


class Residual(nn.Module):
    """Conv-ReLU, a residual add, max pooling, a Linear: every op has an x86 int8 kernel or fuses into one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(x + self.conv2(x)), 2)
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class Block(nn.Module):
    """A transformer block's shape: token embeddings, LayerNorm, attention, GELU MLP, residual adds."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.norm = nn.Embedding(20, 16), nn.LayerNorm(16)
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        x = x + self.out(nn.functional.scaled_dot_product_attention(q, k, v))
        x = x + self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def _int8(net: nn.Module, example: torch.Tensor) -> nn.Module:
    prepared = pt2e.prepare(net, (example,), "x86")
    prepared(example)
    return pt2e.convert(prepared.eval())


def test_a_cnn_of_int8_kernels_leaves_nothing_float():
    int8 = _int8(Residual(), torch.randn(4, 1, 8, 8))
    assert regions.float_ops(int8.exported) == {}
    assert regions.float_weights(int8.exported) == {}


def test_a_transformer_block_names_what_has_no_int8_kernel():
    int8 = _int8(Block(), torch.randint(0, 20, (4, 12)))
    ops = regions.float_ops(int8.exported)
    # the GELU fuses into fc1's int8 kernel; the mean has no quantizer on either side
    assert ops == {"add": 2, "embedding": 1, "layer_norm": 1, "scaled_dot_product_attention": 1, "mean": 1}
    assert regions.float_weights(int8.exported) == {"embedding": 20 * 16, "layer_norm": 2 * 16}
