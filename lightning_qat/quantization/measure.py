"""What int8 bought: the size, the CPU latency and the quantized / float layer counts of a network."""

from __future__ import annotations

import io
import statistics
import time
from typing import Any

import torch
from torch import nn

from lightning_qat.quantization import ao


def serialized_size(network: nn.Module) -> int:
    """Bytes of ``torch.save(network.state_dict())``: what the weights cost on disk."""
    buffer = io.BytesIO()
    with ao.quiet():
        torch.save(network.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def count_quantized_layers(network: nn.Module) -> int:
    """Quantized ops of a converted network: int8 modules with weights and, in FX graphs, int8 functional ops."""
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
    modules = sum(ao.is_quantized_module(m) and hasattr(m, "weight") for m in network.modules())
    functions = 0
    if isinstance(network, torch.fx.GraphModule):
        functions = sum(
            node.op == "call_function" and str(node.target).startswith(("quantized.conv", "quantized.linear"))
            for node in network.graph.nodes
        )
    return modules + functions


def float_parameters(network: nn.Module) -> dict[str, int]:
    """Float parameters left in a converted network, by module type (what int8 does not cover)."""
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
