"""What int8 bought: the size, the CPU latency and the quantized / float layer counts of a network."""

from __future__ import annotations

import io
import operator
import statistics
import time
from typing import Any

import torch
from torch import nn

from lightning_qat.quantization import ao, pt2e, regions


def serialized_size(network: nn.Module) -> int:
    """Bytes of ``torch.save(network.state_dict())``: what the weights cost on disk."""
    buffer = io.BytesIO()
    with ao.quiet():
        torch.save(network.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def count_quantized_layers(network: nn.Module) -> int:
    """Quantized ops of a converted network: int8 modules with weights and, in FX graphs, int8 functional ops."""
    if pt2e.is_exported(network):
        return pt2e.int8_layers(network)
    modules = sum(ao.is_quantized_module(m) and hasattr(m, "weight") for m in network.modules())
    functions = 0
    if isinstance(network, torch.fx.GraphModule):
        functions = sum(
            node.op == "call_function" and str(node.target).startswith("quantized.") for node in network.graph.nodes
        )
    return modules + functions


def count_weight_layers(network: nn.Module) -> int:
    """Quantized layers with weights of a converted network.

    int8 Conv / Linear / Embedding modules and, in FX graphs, int8 functional convolutions and linears (a bare
    ``Conv2d`` traced as the whole network).
    """
    if pt2e.is_exported(network):
        return pt2e.int8_layers(network)
    modules = sum(ao.is_quantized_module(m) and hasattr(m, "weight") for m in network.modules())
    functions = 0
    if isinstance(network, torch.fx.GraphModule):
        functions = sum(
            node.op == "call_function" and str(node.target).startswith(("quantized.conv", "quantized.linear"))
            for node in network.graph.nodes
        )
    return modules + functions


def zero_weights(network: nn.Module) -> float | None:
    """The share of a converted network's int8 weights that are exactly zero (``None``: no int8 weight to count).

    Sparsity (from ``ModelPruning``, say) survives conversion: a zero weight quantizes to the zero point.
    """
    weights = [w for w in map(ao.int8_weight, network.modules()) if w is not None]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else None


def float_parameters(network: nn.Module) -> dict[str, int]:
    """Float parameters left in a converted network, by module type (what int8 does not cover)."""
    if pt2e.is_exported(network):
        found = pt2e.float_parameters(network) | regions.float_weights(network.exported)
        return dict(sorted(found.items(), key=lambda item: -item[1]))
    counts: dict[str, int] = {}
    for module in network.modules():
        if ao.is_quantized_module(module):
            continue
        n = sum(p.numel() for p in module.parameters(recurse=False))
        if n:
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + n
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def measure_latency(
    networks: dict[str, nn.Module], inputs: tuple[Any, ...], backend: str, repeats: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median CPU milliseconds per forward pass of each network, measured interleaved on the same batch and threads."""
    times: dict[str, list[float]] = {name: [] for name in networks}
    with ao.engine(backend), ao.quiet(), torch.inference_mode():
        for _ in range(warmup):
            for network in networks.values():
                network(*inputs)
        for _ in range(repeats):
            for name, network in networks.items():
                start = time.perf_counter()
                network(*inputs)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


_NOT_OPS = (getattr, operator.getitem, "size", "dim", "dequantize", torch.quantize_per_tensor)


def float_ops(network: nn.Module) -> dict[str, int]:
    """Parameter-free operations of a converted FX network that run in float on dequantized int8 tensors, by name.

    Each costs a dequantize before and a quantize after: torch has no int8 kernel for it (timm's SiLU, say). Layers
    with weights kept float are :func:`float_parameters`'. A PT2E graph's: :func:`.regions.float_ops`. Empty for an
    eager-mode network (not counted).
    """
    if pt2e.is_exported(network):
        return regions.float_ops(network.exported)
    if not isinstance(network, torch.fx.GraphModule):
        return {}
    counts: dict[str, int] = {}
    for node in network.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node.target in _NOT_OPS:
            continue
        if not any(arg.op == "call_method" and arg.target == "dequantize" for arg in node.all_input_nodes):
            continue
        if node.op == "call_module":
            module = network.get_submodule(str(node.target))
            if any(True for _ in module.parameters()):
                continue
            name = type(module).__name__
        else:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def layer_times(
    int8: nn.Module,
    float_network: nn.Module,
    inputs: tuple[Any, ...],
    backend: str,
    repeats: int = 10,
    prefix: str = "",
) -> dict[str, tuple[float, float]]:
    """Each int8 layer with weights beside the float module of the same name: name -> (int8 ms, float ms).

    Each is timed alone, interleaved with its twin, on the input it got in one forward pass of ``inputs`` (the fastest
    of ``repeats``): what the int8 kernel costs where the network runs it. The float twin is the float layer alone
    (a fused BatchNorm or activation costs float extra). ``prefix``: what the int8 network puts before the float
    network's names (the eager engine's wrapper: ``"module."``). Layers of a PT2E graph (no modules) or whose names
    the conversion changed otherwise are not timed.
    """
    float_modules = dict(float_network.named_modules())
    pairs = {}
    for name, module in int8.named_modules():
        if not (ao.is_quantized_module(module) and hasattr(module, "weight")):
            continue
        name = name.removeprefix(prefix)
        if name in float_modules:
            pairs[name] = (module, float_modules[name])
    seen: dict[tuple[str, bool], Any] = {}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, key=(name, quantized): seen.setdefault(key, args))
        for name, both in pairs.items()
        for quantized, module in zip((True, False), both, strict=True)
    ]
    times: dict[str, tuple[float, float]] = {}
    with ao.engine(backend), ao.quiet(), torch.inference_mode():
        try:
            int8(*inputs)
            float_network(*inputs)
        finally:
            for handle in handles:
                handle.remove()
        for name, (quantized, twin) in pairs.items():
            if (name, True) in seen and (name, False) in seen:  # a conv or linear: one input
                int8_s, float_s = ao.fastest(
                    (quantized, seen[name, True][0]), (twin, seen[name, False][0]), repeats=repeats
                )
                times[name] = (int8_s * 1e3, float_s * 1e3)
    return times
