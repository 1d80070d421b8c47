"""The eager engine: torch.ao's eager mode for networks torch.fx cannot trace.

Fusion groups are found by running the network once (:func:`find_fusion_groups`); quant / dequant stubs wrap the
network (:class:`EagerQATWrapper`) and every float island (:class:`FloatIsland`). Every op between the stubs must
take quantized tensors, which torch cannot check before converting: the preflight converts a copy in ``setup``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from lightning_qat.quantization import ao, compat
from lightning_qat.quantization.edits import within
from lightning_qat.quantization.engines.base import Engine, Preparation, Prepared, count_fused
from lightning_qat.quantization.inputs import map_tensors
from lightning_qat.quantization.trace import run_once

# Module type sequences eager fusion understands, longest first so Conv+BN+ReLU wins over Conv+BN.
_FUSION_PATTERNS: tuple[tuple[type[nn.Module], ...], ...] = (
    (nn.Conv1d, nn.BatchNorm1d, nn.ReLU),
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    (nn.Conv3d, nn.BatchNorm3d, nn.ReLU),
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Conv1d, nn.ReLU),
    (nn.Conv2d, nn.ReLU),
    (nn.Conv3d, nn.ReLU),
    (nn.Linear, nn.BatchNorm1d),
    (nn.Linear, nn.ReLU),
)


class FloatIsland(nn.Module):
    """Keeps a skipped submodule in float inside an eager-mode quantized network (dequant -> module -> quant)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.dequant = ao.DeQuantStub()
        self.module = module
        self.quant = ao.QuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the float module on dequantized input and quantize its output again."""
        return self.quant(self.module(self.dequant(x)))


class QuantizedAfter(nn.Module):
    """A layer whose int8 form returns float (a weight-only quantized ``nn.Embedding``), then quantized for the rest.

    Eager mode: the next layers of the int8 network take quantized tensors.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.quant = ao.QuantStub()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The layer, its output quantized."""
        # torch's int8 Embedding takes contiguous ids only; Hugging Face passes an expanded buffer (token_type_ids)
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        return self.quant(self.module(*args, **kwargs))


class EagerQATWrapper(nn.Module):
    """Quantizes the inputs and dequantizes the outputs of a network prepared in eager mode.

    Every floating-point tensor of the inputs (positional, or inside tuples, lists and dicts) gets a QuantStub of its
    own, from the example inputs (the first one is ``quant``); integer tensors (ids, masks) pass through as they are.
    Every tensor of the output (alone, or in a tuple, list or dict) is dequantized.
    """

    def __init__(self, module: nn.Module, example_inputs: tuple[Any, ...] = ()) -> None:
        super().__init__()
        paths = _float_tensor_paths(example_inputs) if example_inputs else ["0"]  # integer ids only: no stub
        self._quant_of = {path: "quant" if i == 0 else f"quant_{path}" for i, path in enumerate(paths)}
        for name in self._quant_of.values():
            self.add_module(name, ao.QuantStub())
        self.module = module
        self.dequant = ao.DeQuantStub()

    def forward(self, *inputs: Any) -> Any:
        """Quantize the inputs, run the network, dequantize the outputs."""
        quantized = [self._quantize(x, str(i)) for i, x in enumerate(inputs)]
        return self._dequantize(self.module(*quantized))

    def _quantize(self, value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            name = self._quant_of.get(path)
            return getattr(self, name)(value) if name is not None and value.is_floating_point() else value
        if isinstance(value, dict):
            return {k: self._quantize(v, f"{path}_{k}") for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(self._quantize(v, f"{path}_{i}") for i, v in enumerate(value))
        return value

    def _dequantize(self, value: Any) -> Any:
        return map_tensors(lambda x: self.dequant(x) if x.is_quantized or x.is_floating_point() else x, value)


def _float_tensor_paths(value: Any, path: str = "") -> list[str]:
    """Where the floating-point tensors of a (nested) input structure are: "0", "1", "0_image", ..."""
    if isinstance(value, torch.Tensor):
        return [path] if value.is_floating_point() else []
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return []
    return [p for key, v in items for p in _float_tensor_paths(v, f"{path}_{key}" if path else key)]


def _record_leaf_calls(network: nn.Module, example_inputs: tuple[Any, ...]) -> list[tuple[str, int, int]]:
    """Run ``network`` once and record (name, input id, output id) for every leaf module call, in order."""
    calls: list[tuple[str, int, int]] = []
    handles = []
    for name, sub in network.named_modules():
        if name and not list(sub.children()):

            def hook(_m: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
                first = args[0] if args else None
                calls.append((name, id(first), id(out)))

            handles.append(sub.register_forward_hook(hook))
    run_once(network, example_inputs, handles)
    return calls


def find_fusion_groups(network: nn.Module, example_inputs: tuple[Any, ...]) -> list[list[str]]:
    """Fusable Conv+BN(+ReLU) / Linear(+ReLU) groups of ``network``, checked against a real forward pass.

    A group is fused only when its modules ran once each, back to back, each fed the previous one's output, so a
    ReLU module shared between two places (torchvision's BasicBlock) is never fused away.
    """
    modules = dict(network.named_modules())
    calls = _record_leaf_calls(network, example_inputs)
    counts: dict[str, int] = {}
    for name, _, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    groups: list[list[str]] = []
    i = 0
    while i < len(calls):
        for pattern in _FUSION_PATTERNS:
            window = calls[i : i + len(pattern)]
            if len(window) < len(pattern):
                continue
            types_match = all(type(modules[n]) is t for (n, _, _), t in zip(window, pattern, strict=True))
            chained = all(window[k + 1][1] == window[k][2] for k in range(len(window) - 1))
            once = all(counts[n] == 1 for n, _, _ in window)
            if types_match and chained and once:
                groups.append([n for n, _, _ in window])
                i += len(pattern) - 1
                break
        i += 1
    return groups


class Eager(Engine):
    """torch.ao's eager mode: fused module by module, quantized between stubs."""

    name = "eager"
    formats = ("torchscript", "onnx")
    prefix = "module."  # EagerQATWrapper's
    conversion_hint = (
        " In eager mode every op between QuantStub and DeQuantStub must accept quantized tensors: replace `x + y` "
        "with torch.ao.nn.quantized.FloatFunctional, make the network symbolically traceable (FX mode places "
        "quant/dequant for you), or `skip=` the offending submodule."
    )

    def prepare(self, network: nn.Module, settings: Preparation, kept: dict[str, str]) -> Prepared:
        """Fuse, wrap in stubs and insert fake-quant module by module; ``kept`` layers become float islands."""
        backend, skip, qat = settings.backend, settings.skip, settings.qat
        # A network with its own QuantStub (torchvision's quantizable models) places its own quant/dequant.
        has_stubs = any(isinstance(m, ao.QuantStub) for m in network.modules())
        fuse_model = getattr(network, "fuse_model", None)
        if callable(fuse_model):
            try:
                fuse_model(is_qat=qat)
            except TypeError:
                fuse_model()
        else:
            groups = [g for g in find_fusion_groups(network, settings.example_inputs) if not any(n in skip for n in g)]
            if groups:
                ao.fuse_modules(network, groups, qat=qat)
        islands = list(skip) + list(kept)  # float layers in the int8 region: a dequantize before, a quantize after
        for name in islands:
            island = FloatIsland(network.get_submodule(name))
            ao.set_qconfig(island.module, None)
            compat.set_submodule(network, name, island)
        for name, embedding in list(network.named_modules()):  # weight-only int8, integer ids in, float out
            if isinstance(embedding, nn.Embedding) and not any(within(name, s) for s in islands):
                ao.set_qconfig(embedding, ao.embedding_qconfig(qat))
                compat.set_submodule(network, name, QuantizedAfter(embedding))
        wrapped = network if has_stubs else EagerQATWrapper(network, settings.example_inputs)
        ao.set_qconfig(wrapped, ao.qconfig(backend, qat=qat))
        for module in network.modules():  # per-channel weights are not supported for transposed convolutions
            if isinstance(module, ao.TRANSPOSED_CONVS) and getattr(module, "qconfig", True) is not None:
                ao.set_qconfig(module, ao.per_tensor_weight_qconfig(backend, qat=qat))
        wrapped.train(qat)
        prepared = ao.prepare_eager(wrapped, qat=qat)
        return Prepared(prepared, self, "requested", count_fused(prepared), kept_float=dict(kept))

    def convert(self, model: nn.Module, float_nodes: Collection[str] = ()) -> nn.Module:
        """torch.ao's eager conversion (no graph: ``float_nodes`` does not apply)."""
        return ao.convert_eager(model)
