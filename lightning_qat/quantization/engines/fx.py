"""The FX engine: torch.fx traces the network, torch.ao fuses it and inserts fake-quant by graph patterns.

Skipped modules and modules called at several places stay float inside :class:`Unfused`; torch's attention modules
are decomposed so their projections are quantized (:mod:`~lightning_qat.quantization.attention`); after preparing,
:mod:`~lightning_qat.quantization.passes` fix what torch's graph gets wrong. The accuracy-budget search converts its
graph with nodes left float.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from lightning_qat.exceptions import NotTraceable
from lightning_qat.quantization import ao, compat, passes
from lightning_qat.quantization.attention import decompose_attention, restore
from lightning_qat.quantization.edits import shared_stateful_modules, within
from lightning_qat.quantization.engines.base import Engine, Preparation, Prepared, count_fused
from lightning_qat.quantization.trace import conv_bn_pairs, own_forward_convs, trace, train_eval_leaves


class Unfused(nn.Module):
    """Keeps a module out of FX fusion and quantization: FX does not trace into it, so it runs in float.

    For skipped modules (``skip=``) and for modules with weights that the forward calls at several places: FX would
    fuse the BatchNorm of one call site into the shared module and use that fused module at every call site.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped module."""
        return self.module(*args, **kwargs)


class FX(Engine):
    """torch.ao's FX graph mode: every quantizable op of a traceable network, fused by graph patterns."""

    name = "fx"
    formats = ("torchscript", "onnx")
    searchable = True

    def owns(self, network: nn.Module) -> bool:
        """An FX-prepared network is a ``GraphModule``."""
        return isinstance(network, torch.fx.GraphModule)

    def prepare(self, network: nn.Module, settings: Preparation, kept: dict[str, str]) -> Prepared:
        """FX preparation; the network is left as it was when it fails.

        Raises:
            NotTraceable: when torch.fx (ours, or torch's QAT tracer) cannot trace the network.
        """
        skip, example_inputs = settings.skip, settings.example_inputs
        decomposed, attention_float = decompose_attention(network, skip)
        shared = [n for n in shared_stateful_modules(network, example_inputs) if not any(within(n, s) for s in skip)]
        islands = sorted(set(skip) | set(shared))
        originals = {name: network.get_submodule(name) for name in islands}
        for name in islands:
            compat.set_submodule(network, name, Unfused(originals[name]))
        try:
            return self._prepare(network, settings, kept, islands, shared, attention_float, decomposed)
        except BaseException:  # the network as it came: eager mode (or the user) gets it untouched
            for name in reversed(islands):
                compat.set_submodule(network, name, originals[name])
            restore(network, decomposed)
            raise

    def _prepare(
        self,
        network: nn.Module,
        settings: Preparation,
        kept: dict[str, str],
        islands: Sequence[str],
        shared: list[str],
        attention_float: dict[str, str],
        decomposed: dict[str, nn.Module],
    ) -> Prepared:
        example_inputs = settings.example_inputs
        try:
            traced = trace(network, (Unfused,), example_inputs)
        except Exception as err:  # noqa: BLE001 - tracing runs the user's code on proxies: anything can fail
            why = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            raise NotTraceable(f"{type(network).__name__} cannot be symbolically traced ({why})") from err
        pairs = conv_bn_pairs(traced.module)
        float_layers = [n for n in kept if not any(within(n, i) for i in islands)]
        mapping = ao.qconfig_mapping(settings.backend, float_layers, settings.qat)
        leaves = (*train_eval_leaves(network), Unfused, *own_forward_convs(traced.module))  # the ones not made static
        try:
            prepared = ao.prepare_fx(traced.module, mapping, example_inputs, settings.qat, leaf_classes=leaves)
        except Exception as err:  # noqa: BLE001 - torch's QAT tracer traces the graph again, its own way
            why = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            raise NotTraceable(f"{type(network).__name__} cannot be prepared by torch's FX tracer ({why})") from err
        passes.drop_fake_quant_of_integer_tensors(prepared, example_inputs)
        passes.copy_parameter_views(prepared)
        passes.share_cat_quantizers(prepared)
        for name, value in vars(network).items():  # plain attributes (`self.net.num_classes`) keep working
            if not name.startswith("_") and name != "training" and not hasattr(prepared, name):
                setattr(prepared, name, value)
        still_called = {str(node.target) for node in prepared.graph.nodes if node.op == "call_module"}
        unfused = [f"{conv} -> {bn}: {why or 'not fused by torch'}" for conv, bn, why in pairs if bn in still_called]
        said = []
        size = "x".join(str(n) for n in _spatial_size(example_inputs))
        if traced.same_padding:
            said.append(
                f"QAT: {len(traced.same_padding)} same-padding convolutions (timm's Conv2dSame) pad statically for "
                f"the example input ({size}): the QAT and int8 networks expect inputs of that size."
            )
        if traced.specialized:
            said.append(
                f"QAT: {len(traced.specialized)} conditions on input shapes were decided for the example input "
                f"({size}) when tracing ({'; '.join(traced.specialized[:3])}): the QAT and int8 networks take those "
                "branches."
            )
        return Prepared(
            prepared,
            self,
            "",
            count_fused(prepared),
            shared=shared,
            warnings=said,
            conv_bn_pairs=len(pairs),
            conv_bn_unfused=unfused,
            kept_float=kept | attention_float,
            attention=len([m for m in decomposed.values() if isinstance(m, nn.MultiheadAttention)]),
        )

    def convert(self, model: nn.Module, float_nodes: Collection[str] = ()) -> nn.Module:
        """torch.ao's FX conversion; ``float_nodes`` (graph node names) stay float."""
        return ao.convert_fx(model, float_nodes)


def _spatial_size(example_inputs: tuple[Any, ...]) -> tuple[int, ...]:
    first = next((x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() >= 3), None)
    return tuple(first.shape[2:]) if first is not None else ()
