"""The engine interface: one object per way of quantizing a network, and what preparing a network returns.

Like Lightning's strategies: the callback, the end-of-fit pipeline, the preflight and ``convert_checkpoint`` ask the
engine (:attr:`Prepared.engine`) what it writes, what it refuses and how it converts; no code outside the engines
tests an engine by name. Adding an engine is a new module with a subclass of :class:`Engine`, and a registry entry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from lightning_qat.quantization import ao, dynamic


@dataclass(frozen=True)
class Needs:
    """What a run asks of the engine ``engine="auto"`` picks, beside taking the network.

    ``formats``: the artifact formats the user named (empty: the engine's own); ``dynamic``: dynamic int8
    activations asked for; ``search``: the accuracy-budget search (``on_drop="fallback"``).
    """

    formats: tuple[str, ...] = ()
    dynamic: bool = False
    search: bool = False


@dataclass
class Preparation:
    """What preparing a network needs, whatever the engine: the settings that shape the QAT graph.

    ``skip``: qualified submodule names kept float. ``example_inputs``: a batch the network takes (traced, captured
    or run once). ``qat=False`` prepares for post-training calibration instead (observers, eval mode).
    """

    backend: str
    skip: Sequence[str] = ()
    example_inputs: tuple[Any, ...] = ()
    qat: bool = True
    relu6_to_relu: bool = False
    needs: Needs = field(default_factory=Needs)


@dataclass
class Prepared:
    """What an engine's :meth:`Engine.prepare` did, and the engine that did it."""

    module: nn.Module
    engine: Engine
    reason: str
    num_fused: int
    relu6_replaced: int = 0
    shared: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # for the user, said by the caller (the Lightning layer)
    folded: list[str] = field(default_factory=list)  # layers whose weight norm (or other parametrization) was folded
    conv_bn_pairs: int | None = None  # convolutions followed by a BatchNorm (None: not counted)
    conv_bn_unfused: list[str] = field(default_factory=list)  # "conv -> bn: why", for the pairs left unfused
    kept_float: dict[str, str] = field(default_factory=dict)  # layers kept float by the engine: name -> why
    attention: int = 0  # nn.MultiheadAttention modules decomposed so their projections are quantized (FX)
    kernels: dict[str, str] = field(
        default_factory=dict
    )  # kept float for this CPU's int8 kernels: a checkpointed decision
    activations: str | None = None  # fixed by the capture ("static" / "dynamic"); None: chosen after, by timing

    @property
    def mode(self) -> str:
        """The engine's name, as checkpoints and reports store it."""
        return self.engine.name


class Engine(ABC):
    """Prepares a float network for QAT, converts a CPU copy to int8, and says what it writes and refuses.

    Class attributes describe the engine for the layers above: ``formats`` (the artifact formats it writes, the
    default first), ``backends`` (the targets it quantizes for), ``searchable`` (the accuracy-budget search can keep
    its layers float: a graph it can convert with nodes left float), ``dynamic`` (it has dynamic int8 activations),
    ``layer_modules`` (its QAT layers are modules whose per-layer SQNR can be measured), ``compiled`` (its artifact
    is compiled or lowered ahead of time, not traced) and ``prefix`` (what its networks put before the user's layer
    names).
    """

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]
    backends: ClassVar[tuple[str, ...]] = ("x86", "fbgemm", "qnnpack")  # torch.ao's quantized engines
    registry: ClassVar[dict[str, Engine]] = {}  # every engine by name, filled by the engines package
    searchable: ClassVar[bool] = False
    dynamic: ClassVar[bool] = True
    layer_modules: ClassVar[bool] = True
    compiled: ClassVar[bool] = False
    prefix: ClassVar[str] = ""
    conversion_hint: ClassVar[str] = ""  # added to a failing int8 forward pass's error

    def check(self, backend: str) -> None:
        """Raise when this engine cannot run here with ``backend`` (a missing extra, a backend it has not).

        Raises:
            ValueError: for a backend this engine does not target, naming the engines that do.
        """
        if backend not in self.backends:
            others = [name for name, engine in self.registry.items() if backend in engine.backends]
            raise ValueError(
                f"engine={self.name!r} quantizes for backends {list(self.backends)}, not backend={backend!r}: use "
                f"engine={' or '.join(map(repr, others))} for it, or engine='auto'."
            )

    def refuses(self, settings: Preparation) -> str:
        """Why this engine cannot serve a run with ``settings`` here (``""``: it can), whatever the network."""
        try:
            self.check(settings.backend)
        except (ImportError, RuntimeError, ValueError) as err:
            return str(err)
        missing = [fmt for fmt in settings.needs.formats if fmt not in self.formats]
        if missing:
            return f"it does not write {missing}"
        if settings.needs.dynamic and not self.dynamic:
            return "it has no dynamic int8 activations"
        if settings.needs.search and not self.can_search(settings.needs.dynamic):
            return "the accuracy-budget search cannot keep its layers float"
        return ""

    def owns(self, network: nn.Module) -> bool:
        """Whether ``network`` is a QAT network of this engine's (one loaded without its preparation record)."""
        return False

    @abstractmethod
    def prepare(self, network: nn.Module, settings: Preparation, kept: dict[str, str]) -> Prepared:
        """Fuse and insert fake-quant into ``network`` (already edited: :mod:`~lightning_qat.quantization.edits`).

        ``kept``: layers to keep float for this CPU's kernels (name -> why), beside ``settings.skip``.
        """

    @abstractmethod
    def convert(self, model: nn.Module, float_nodes: Collection[str] = ()) -> nn.Module:
        """The int8 form of the QAT ``model`` (a CPU copy the caller made); ``float_nodes`` stay float."""

    def to_dynamic(self, model: nn.Module, float_layers: Collection[str] = ()) -> nn.Module:
        """The dynamic int8 form of the QAT ``model``: torch.ao's dynamic Linears, ``float_layers`` float."""
        return dynamic.to_dynamic(model, float_layers)

    def can_search(self, dynamic: bool) -> bool:
        """Whether the accuracy-budget search can keep layers float: in its graph, or among dynamic Linear modules."""
        return self.searchable or (dynamic and self.dynamic and self.layer_modules)


def count_fused(network: nn.Module) -> int:
    """How many of torch's fused modules ``network`` holds."""
    return sum(ao.is_fused_module(m) for m in network.modules())
