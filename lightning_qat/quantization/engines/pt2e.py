"""The PT2E engine: ``torch.export`` captures the network, torchao's x86 quantizer annotates it.

The torchao seam is :mod:`lightning_qat.quantization.pt2e`; the artifact is an AOTInductor package compiled ahead of
time (:mod:`lightning_qat.export.aoti`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import ClassVar

from torch import nn

from lightning_qat.exceptions import NotTraceable
from lightning_qat.quantization import pt2e
from lightning_qat.quantization.edits import shared_stateful_modules, within
from lightning_qat.quantization.engines.base import Engine, Preparation, Prepared


class PT2E(Engine):
    """torchao's PT2E flow on the x86 inductor quantizer; static int8 activations, or dynamic ones for Linears only.

    Dynamic activations are captured into the graph (torchao's dynamic x86 config: per-batch fake-quant in training,
    ``choose_qparams`` at run time), so they are fixed at prepare: ``activations="auto"`` times both captures in the
    Lightning layer's ``setup`` and captures again for the faster.
    """

    name = "pt2e"
    formats = ("pt2",)
    backends: ClassVar[tuple[str, ...]] = pt2e.BACKENDS
    searchable = True
    dynamic = True
    layer_modules = False  # torchao's graph has no QAT layer modules to measure one by one
    compiled = True

    def check(self, backend: str) -> None:
        """Raise unless torchao's PT2E flow runs here with ``backend``.

        Raises:
            PT2EUnavailable: without torchao, or on a torch older than torchao needs.
            ValueError: for a backend torchao's quantizers here do not target.
        """
        pt2e.require()
        super().check(backend)

    def owns(self, network: nn.Module) -> bool:
        """A PT2E network is torchao's prepared graph in an ``ExportedQAT``, annotated for this engine's backends."""
        return pt2e.is_exported(network) and network.backend in self.backends

    def prepare(self, network: nn.Module, settings: Preparation, kept: dict[str, str]) -> Prepared:
        """Capture and prepare with torchao; refuses modules called at several places.

        Raises:
            NotTraceable: when ``torch.export`` cannot capture the network, or a stateful module is called twice
                (torchao's Conv-BN rewrite and conversion treat each call as a layer of its own).
        """
        skip, example_inputs = settings.skip, settings.example_inputs
        shared = [n for n in shared_stateful_modules(network, example_inputs) if not any(within(n, s) for s in skip)]
        if shared:  # converted, such a network computes something else (docs/pt2e.md has the measurement)
            raise NotTraceable(
                f"{shared} are called at several places in one forward pass: torchao's Conv-BN rewrite and its "
                "conversion treat each call as its own layer and the int8 network would compute something else "
                "(FX keeps shared modules float; or call a copy of the module at each place)"
            )
        dynamic = settings.needs.dynamic
        exported = pt2e.prepare(network, example_inputs, settings.backend, skip, settings.qat, dynamic)
        fused = pt2e.conv_bn_count(exported)
        activations = "dynamic" if dynamic else "static"
        return Prepared(exported, self, "requested", fused, conv_bn_pairs=fused, activations=activations)

    def convert(self, model: nn.Module, float_nodes: Collection[str] = ()) -> nn.Module:
        """Torchao's ``convert_pt2e``: a quantize / dequantize graph, int8 once inductor compiles it."""
        assert pt2e.is_exported(model), "prepared by PT2E.prepare"
        return pt2e.convert(model, float_nodes)

    def can_search(self, dynamic: bool) -> bool:
        """With static activations: a dynamic one is computed in the graph per batch, with no quantizer to drop."""
        return not dynamic

    def to_dynamic(self, model: nn.Module, float_layers: Collection[str] = ()) -> nn.Module:
        """The graph was captured with dynamic activations: its conversion is the dynamic int8 network."""
        return self.convert(model)
