"""torch's attention modules rewritten so FX quantizes their projections: every Linear of a transformer in int8.

``nn.MultiheadAttention`` computes its projections inside one functional call, so torch's FX quantization keeps it
float whole (its in-projection is not even a module, its out-projection a ``NonDynamicallyQuantizableLinear``).
``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` branch on ``src.dim()`` (FX cannot trace them) and, in
evaluation, run a fused kernel that bypasses their Linear modules. :func:`decompose_attention` swaps each for a
module computing the same function from the same parameter tensors, written as ``nn.Linear`` calls around one
float attention core (:class:`AttentionCore`, an FX leaf that reads ``self.training`` when it runs, so attention
dropout follows ``train()``/``eval()``). FX then quantizes the in- and out-projections like any Linear; the softmax
attention itself stays float. The state dict keys change (``in_proj.weight`` for ``in_proj_weight``), the same way
for the QAT checkpoint and every later preparation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

from lightning_qat.quantization import compat


class AttentionCore(nn.Module):
    """Scaled dot-product attention over packed or separate q, k, v: float, a leaf of the FX trace.

    Inputs are batch-first (N, L, E); masks as ``nn.MultiheadAttention`` takes them (bool: ``True`` is masked out,
    float: added). Returns the attention output (N, L, E) and the weights (``None`` unless ``need_weights``).
    """

    def __init__(self, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``q`` over ``k``, ``v``; with ``k``, ``v`` ``None``, ``q`` is the packed (N, L, 3E) tensor."""
        if k is None or v is None:
            q, k, v = q.chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # (N, H, L, D)
        mask = _additive_mask(attn_mask, key_padding_mask, q)
        causal = is_causal and mask is None  # a mask given is the causal mask itself (the hint's meaning in torch)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
            if causal:
                size = (q.shape[-2], k.shape[-2])
                scores = scores.masked_fill(torch.ones(size, dtype=torch.bool).triu(1), float("-inf"))
            weights = F.dropout((scores if mask is None else scores + mask).softmax(-1), dropout, self.training)
            out = weights @ v
            returned: torch.Tensor | None = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
            returned = None
        return out.transpose(1, 2).flatten(2), returned


def _additive_mask(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, query: torch.Tensor
) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s two masks as one float mask broadcasting over (N, H, L, S), or ``None``."""
    mask = None
    if attn_mask is not None:
        mask = _as_float(attn_mask, query.dtype)
        mask = mask.unflatten(0, (-1, query.shape[1])) if mask.dim() == 3 else mask  # (N*H, L, S) -> (N, H, L, S)
    if key_padding_mask is not None:
        padding = _as_float(key_padding_mask, query.dtype)[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return mask


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` as Linear modules FX quantizes: ``in_proj`` (E -> 3E) and ``out_proj`` (E -> E).

    Same parameters (the same tensors), same arguments and outputs. Self-attention (one tensor as query, key and
    value) runs ``in_proj`` as one int8 Linear; cross-attention projects each input with its slice of the weight
    through ``F.linear``, which FX quantizes as a functional linear.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        assert why_not_decomposed(mha) is None
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        with torch.device("meta"):  # the parameters are the MultiheadAttention's own tensors, set below
            self.in_proj = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=mha.in_proj_bias is not None)
            self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=mha.out_proj.bias is not None)
        self.in_proj.weight = mha.in_proj_weight
        self.in_proj.bias = mha.in_proj_bias
        self.out_proj.weight = mha.out_proj.weight
        self.out_proj.bias = mha.out_proj.bias
        self.attend = AttentionCore(mha.num_heads, mha.dropout)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (batched inputs)."""
        self_attention = query is key and key is value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        masks = {
            "attn_mask": attn_mask,
            "key_padding_mask": key_padding_mask,
            "need_weights": need_weights,
            "average_attn_weights": average_attn_weights,
            "is_causal": is_causal,
        }
        if self_attention:
            out, weights = self.attend(self.in_proj(query), **masks)
        else:
            w, b = self.in_proj.weight.chunk(3), [None] * 3 if self.in_proj.bias is None else self.in_proj.bias.chunk(3)
            q, k, v = (F.linear(t, w[i], b[i]) for i, t in enumerate((query, key, value)))
            out, weights = self.attend(q, k, v, **masks)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), weights


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer``'s computation without its fast path: same children, traceable, Linears called."""

    self_attn: nn.Module
    linear1: nn.Module
    linear2: nn.Module
    norm1: nn.Module
    norm2: nn.Module
    dropout: nn.Module
    dropout1: nn.Module
    dropout2: nn.Module
    activation: Any

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.norm_first = layer.norm_first
        if "activation" not in self._modules:  # a function (F.relu, F.gelu), not a module
            self.activation = layer.activation

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """As ``nn.TransformerEncoderLayer.forward``."""
        x = src
        if self.norm_first:
            x = x + self._attention(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attention(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._feed_forward(x))

    def _attention(
        self, x: torch.Tensor, mask: torch.Tensor | None, padding: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        out = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False, is_causal=is_causal)
        return self.dropout1(out[0])

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` without its nested-tensor fast path: its layers in turn, then its norm."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = encoder.layers
        self.norm = encoder.norm

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        """As ``nn.TransformerEncoder.forward``."""
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return x if self.norm is None else self.norm(x)


class WindowCore(nn.Module):
    """torchvision Swin's shifted-window attention between its two Linears: float, a leaf of the FX trace.

    Takes the (padded) in-projection ``qkv`` (B, H, W, 3C) and the relative position bias table and index; returns
    the attention output (B, H, W, C) before the out-projection, windows merged and the shift undone. Linears act on
    each token alone, so projecting before the shift and the window partition computes what torchvision computes.
    """

    def __init__(self, window_size: list[int], shift_size: list[int], num_heads: int, dropout: float) -> None:
        super().__init__()
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads, self.dropout = num_heads, dropout

    def forward(self, qkv: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Window attention of the projected map ``qkv``, with the relative position bias ``table[index]``."""
        batch, height, width, channels = qkv.shape
        (wh, ww), heads, dim = self.window_size, self.num_heads, channels // 3
        shift = [0 if wh >= height else self.shift_size[0], 0 if ww >= width else self.shift_size[1]]
        if sum(shift) > 0:
            qkv = torch.roll(qkv, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = (height // wh) * (width // ww)
        qkv = qkv.view(batch, height // wh, wh, width // ww, ww, channels).permute(0, 1, 3, 2, 4, 5)
        q, k, v = qkv.reshape(batch * windows, wh * ww, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)
        size = wh * ww
        attn = attn + table[index].view(size, size, -1).permute(2, 0, 1).unsqueeze(0)
        if sum(shift) > 0:
            attn = attn.view(batch, windows, heads, size, size) + _shift_mask(height, width, wh, ww, shift, attn)
            attn = attn.view(-1, heads, size, size)
        attn = F.dropout(attn.softmax(-1), self.dropout, self.training)
        out = (attn @ v).transpose(1, 2).reshape(batch, height // wh, width // ww, wh, ww, dim)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, dim)
        return torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2)) if sum(shift) > 0 else out


def _shift_mask(height: int, width: int, wh: int, ww: int, shift: list[int], like: torch.Tensor) -> torch.Tensor:
    """-100 between tokens of a shifted window that come from different regions of the map (Swin's mask)."""
    region = like.new_zeros((height, width))
    count = 0
    for h in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
        for w in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
            region[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    region = region.view(height // wh, wh, width // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    different = region.unsqueeze(1) != region.unsqueeze(2)
    return torch.zeros_like(different, dtype=like.dtype).masked_fill(different, -100.0)[None, :, None]


class WindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` (Swin V1) with ``qkv`` and ``proj`` called as the Linears they are.

    torchvision passes their weights to one function, so FX sees no Linear to quantize. Same parameters and buffers
    under the same names (the checkpoint keys do not change).
    """

    def __init__(self, swa: ShiftedWindowAttention) -> None:
        super().__init__()
        self.window_size, self.dropout = list(swa.window_size), swa.dropout
        self.qkv, self.proj = swa.qkv, swa.proj
        self.relative_position_bias_table = swa.relative_position_bias_table
        self.register_buffer("relative_position_index", swa.relative_position_index)
        self.attend = WindowCore(swa.window_size, swa.shift_size, swa.num_heads, swa.attention_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As ``ShiftedWindowAttention.forward``: (B, H, W, C) in and out."""
        height, width = x.shape[1], x.shape[2]
        pad_right = (self.window_size[1] - width % self.window_size[1]) % self.window_size[1]
        pad_bottom = (self.window_size[0] - height % self.window_size[0]) % self.window_size[0]
        x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        out = self.attend(self.qkv(x), self.relative_position_bias_table, self.relative_position_index)
        out = F.dropout(self.proj(out), self.dropout, self.training)
        return out[:, :height, :width].contiguous()


def why_not_decomposed(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` stays an ``nn.MultiheadAttention`` (float), or ``None`` when :class:`Attention` computes it."""
    if not mha._qkv_same_embed_dim:
        return "nn.MultiheadAttention with kdim/vdim other than embed_dim stays float"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv / add_zero_attn stays float"
    return None


_REWRITES: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.TransformerEncoder, Encoder),
    (nn.TransformerEncoderLayer, EncoderLayer),
    (nn.MultiheadAttention, Attention),
    (ShiftedWindowAttention, WindowAttention),
)


def decompose_attention(network: nn.Module, skip: Sequence[str] = ()) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Swap torch's attention modules in ``network`` (outside ``skip``) for their quantizable forms, in place.

    Exact types only (a subclass may have a forward of its own). Returns the modules replaced (name -> original, for
    :func:`restore`) and the attention modules left float (name -> why).
    """
    replaced: dict[str, nn.Module] = {}
    left: dict[str, str] = {}
    for name, module in list(network.named_modules()):
        if not name or any(name == s or name.startswith(f"{s}.") for s in skip):
            continue
        for original, rewrite in _REWRITES:
            if type(module) is not original:
                continue
            why = why_not_decomposed(module) if isinstance(module, nn.MultiheadAttention) else None
            if why is not None:
                left[name] = why
                break
            new: Any = rewrite(module)  # type: ignore[call-arg, unused-ignore]  # each takes the module it replaces
            new.train(module.training)
            compat.set_submodule(network, name, new)
            replaced[name] = module
            break
    return replaced, left


def restore(network: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Undo :func:`decompose_attention` (before an eager-mode fallback)."""
    for name in reversed(list(replaced)):
        compat.set_submodule(network, name, replaced[name])
