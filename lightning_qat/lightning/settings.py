"""The callback's arguments: their choice sets, every check of them, and what the end-of-fit pipeline reads.

:class:`~lightning_qat.QATCallback` validates every argument in ``__init__`` through :func:`check_arguments`, so a
wrong value fails before any training with the value and the valid choices named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_warn

from lightning_qat.choices import check_choice, check_count, check_flag, choices_of
from lightning_qat.export.onnx import check_onnx_available
from lightning_qat.lightning.evaluate import Stage
from lightning_qat.lightning.report import MonitorMode
from lightning_qat.quantization import engines
from lightning_qat.quantization.engines import Mode
from lightning_qat.quantization.schedule import Interval, check_after

OnDrop = Literal["warn", "raise", "fallback"]
Activations = Literal["auto", "static", "dynamic"]
ExportFormat = Literal["torchscript", "onnx", "pt2", "pte"]
ConvertFrom = Literal["last", "best"]
FallbackAt = int | float | Literal["bn", "end"]


def check_export(export: Sequence[str], mode: str = "auto", backend: str | None = None) -> None:
    """Raise ``ValueError`` unless ``export`` is a list of distinct formats the engine of ``mode`` writes.

    Raises:
        OnnxExtraMissing: for ``"onnx"`` without onnx / onnxruntime installed.
    """
    if isinstance(export, str) or len(set(export)) != len(export):
        raise ValueError(
            f"export={export!r} must be a list of distinct formats from {choices_of(ExportFormat)} ([]: none)."
        )
    for fmt in export:
        check_choice("export", fmt, ExportFormat)
    formats = list(engines.get(mode, backend).formats)
    wrong = [fmt for fmt in export if fmt not in formats]
    if wrong:
        owners = "; ".join(
            f"the {fmt!r} package needs engine={' or '.join(map(repr, engines.writing(fmt)))}" for fmt in wrong
        )
        raise ValueError(
            f"export={list(export)!r}: engine={mode!r} cannot write {wrong}; its formats are {formats} ({owners})."
        )
    if "onnx" in export:
        check_onnx_available()


def check_engine(mode: str, backend: str, on_drop: str, activations: str) -> None:
    """Raise unless the engine of ``mode`` can run here with these settings.

    Raises:
        PT2EUnavailable: for the PT2E engine without torchao, or on a torch older than torchao needs.
        ValueError: for a backend, ``on_drop`` or ``activations`` the engine does not have.
    """
    engine = engines.get(mode, backend)
    engine.check(backend)
    possible = {"static": (False,), "dynamic": (True,)}.get(activations, (False, True))  # "auto": either
    if on_drop == "fallback" and not any(engine.can_search(dynamic) for dynamic in possible):
        raise ValueError(
            f"on_drop='fallback' with engine={engine.name!r} and activations={activations!r}: that engine cannot keep "
            "layers float there (FX can; PT2E with static activations; eager among dynamic int8 Linears; XNNPACK not "
            "yet). Use on_drop='warn' or 'raise'."
        )
    if activations == "dynamic" and not engine.dynamic:
        dynamic = [name for name, other in engines.ENGINES.items() if other.dynamic]
        raise ValueError(
            f"activations='dynamic' is an artifact of engines {dynamic}; engine={mode!r} quantizes activations "
            "statically."
        )


def check_guard(monitor: str | None, max_metric_drop: float | None, evaluate: Stage | None) -> None:
    """Raise ``ValueError`` for a guard that cannot work: a budget without a metric, a metric not evaluated."""
    if max_metric_drop is not None and (monitor is None or max_metric_drop < 0):
        raise ValueError(
            f"max_metric_drop={max_metric_drop!r} needs a `monitor` metric name and a value >= 0 (monitor={monitor!r})."
        )
    if monitor is not None and evaluate is None:
        raise ValueError(f"monitor={monitor!r} needs evaluate='val' or 'test', not None.")


def check_fallback_at(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is ``"bn"``, ``"end"``, an int >= 1 or a float in (0, 1)."""
    if value in ("bn", "end"):
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not ((isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value < 1)):
        raise ValueError(
            f"fallback_at={value!r} is invalid; use 'bn' (when BatchNorm statistics freeze), 'end' (at the end of fit "
            "only), an int >= 1 (an epoch or step index: observers must have seen data) or a float in (0, 1) (a "
            "fraction of the run)."
        )


class Arguments(Protocol):
    """The :class:`~lightning_qat.QATCallback` arguments these checks and settings read (mypy checks the names)."""

    backend: str
    engine: Mode
    skip: Any
    interval: Interval
    freeze_bn_after: int | float | None
    freeze_observers_after: int | float | None
    evaluate: Stage | None
    monitor: str | None
    monitor_mode: MonitorMode
    max_metric_drop: float | None
    on_drop: OnDrop
    export: list[ExportFormat]
    ptq_baseline: bool
    ptq_batches: int
    latency_repeats: int
    weights: ConvertFrom
    untrained_float: bool
    activations: Activations
    keep_slow_float: bool


@dataclass
class FinishSettings:
    """The :class:`~lightning_qat.QATCallback` arguments the end-of-fit pipeline reads (documented there)."""

    backend: str
    evaluate: Stage | None = "val"
    monitor: str | None = None
    monitor_mode: MonitorMode = "max"
    max_metric_drop: float | None = None
    on_drop: OnDrop = "warn"
    export: Sequence[ExportFormat] = ("torchscript",)
    ptq_baseline: bool = False
    ptq_batches: int = 8
    latency_repeats: int = 20
    weights: ConvertFrom = "last"
    untrained_float: bool = False
    freezing: dict[str, str] = field(default_factory=dict)  # where BatchNorm / observers froze in the fit

    @property
    def save_artifact(self) -> bool:
        """Whether the end of fit writes artifacts: ``export`` names at least one format."""
        return bool(self.export)

    @classmethod
    def of(cls, arguments: Arguments, freezing: dict[str, str]) -> FinishSettings:
        """The settings of a :class:`~lightning_qat.QATCallback` (its ``arguments``), field by field."""
        a = arguments
        return cls(
            backend=a.backend,
            evaluate=a.evaluate,
            monitor=a.monitor,
            monitor_mode=a.monitor_mode,
            max_metric_drop=a.max_metric_drop,
            on_drop=a.on_drop,
            export=list(a.export),
            ptq_baseline=a.ptq_baseline,
            ptq_batches=a.ptq_batches,
            latency_repeats=a.latency_repeats,
            weights=a.weights,
            untrained_float=a.untrained_float,
            freezing=freezing,
        )


def check_arguments(
    callback: Arguments,
    export: Sequence[ExportFormat] | None,
    ptq_batches: int | None,
    fallback_at: FallbackAt | None,
    given_backend: str | None = None,
) -> list[ExportFormat]:
    """Raise for any :class:`~lightning_qat.QATCallback` argument outside its choices, or given without its partner.

    ``callback`` holds the other arguments as its attributes (``backend`` resolved already); ``export``,
    ``ptq_batches``, ``fallback_at`` and ``given_backend`` are as given (``None``: not given). Returns the export
    formats (``export=None``: the engine's own). ``backend="qnnpack"`` given by name warns: its TorchScript artifact is
    not what a phone runs any more.

    Raises:
        ValueError: naming the argument, its value and the valid values (or the argument it needs).
        OnnxExtraMissing: for ``"onnx"`` without onnx / onnxruntime installed.
        PT2EUnavailable: for the PT2E engine without torchao.
    """
    c = callback
    check_choice("engine", c.engine, Mode)
    check_choice("interval", c.interval, Interval)
    check_choice("evaluate", c.evaluate, Stage | None)
    check_choice("monitor_mode", c.monitor_mode, MonitorMode)
    check_choice("on_drop", c.on_drop, OnDrop)
    check_choice("weights", c.weights, ConvertFrom)
    check_choice("activations", c.activations, Activations)
    if isinstance(c.skip, str) or not all(isinstance(s, str) for s in c.skip):
        raise ValueError(f"skip={c.skip!r} must be a list of submodule names, e.g. ['classifier', 'features.0'].")
    check_after("freeze_bn_after", c.freeze_bn_after)
    check_after("freeze_observers_after", c.freeze_observers_after)
    check_guard(c.monitor, c.max_metric_drop, c.evaluate)
    if c.on_drop == "fallback" and c.max_metric_drop is None:
        raise ValueError(f"on_drop='fallback' needs max_metric_drop (the budget to meet) and monitor={c.monitor!r}.")
    if fallback_at is not None:
        check_fallback_at(fallback_at)
        if c.on_drop != "fallback":
            raise ValueError(
                f"fallback_at={fallback_at!r} only acts with on_drop='fallback' (on_drop={c.on_drop!r}): set both, "
                "or drop fallback_at."
            )
    for name in ("relu6_to_relu", "ptq_baseline", "sync_observers", "untrained_float", "overwrite", "keep_slow_float"):
        check_flag(name, getattr(c, name))
    if ptq_batches is not None:
        check_count("ptq_batches", ptq_batches)
        if not c.ptq_baseline:
            raise ValueError(
                f"ptq_batches={ptq_batches!r} only acts with ptq_baseline=True: set both, or drop ptq_batches."
            )
    engine = engines.get(c.engine, c.backend)
    formats: list[ExportFormat] = list(export) if export is not None else [engine.formats[0]]  # type: ignore[list-item]
    check_export(formats, c.engine, c.backend)
    check_engine(c.engine, c.backend, c.on_drop, c.activations)
    check_count("latency_repeats", c.latency_repeats)
    if given_backend == "qnnpack" and "torchscript" in formats:
        rank_zero_warn(
            "QAT: backend='qnnpack' ships a TorchScript artifact, which on a phone only PyTorch Mobile's lite "
            "interpreter loads, and it is no longer maintained. For a phone, use backend='xnnpack': an ExecuTorch "
            ".pte program on XNNPACK, qnnpack's successor (pip install 'lightning-qat[mobile]'; the manual's "
            "deployment page). On an ARM server, qnnpack's TorchScript artifact is right."
        )
    return formats


def renamed(
    mode: Mode | None,
    engine: Mode,
    convert: ConvertFrom | None,
    weights: ConvertFrom,
    save_artifact: bool | None,
    export: Sequence[ExportFormat] | None,
) -> tuple[Mode, ConvertFrom, Sequence[ExportFormat] | None]:
    """``(engine, weights, export)`` from the arguments, old names (``mode``, ``convert``, ``save_artifact``) included.

    An old name warns (it goes in the next release); an old and a new name of one setting given together is an error.

    Raises:
        ValueError: when both names of one setting are given.
    """
    for old, old_value, new, new_value, default in (
        ("mode", mode, "engine", engine, "auto"),
        ("convert", convert, "weights", weights, "last"),
        ("save_artifact", save_artifact, "export", export, None),
    ):
        if old_value is None:
            continue
        if new_value != default:
            raise ValueError(f"{old}={old_value!r} and {new}={new_value!r} are one setting: give {new} only.")
        rank_zero_deprecation(
            f"QATCallback({old}=...) is deprecated: use {new}= (the old name goes in the next release)."
        )
    export = [] if save_artifact is False else export
    return mode or engine, convert or weights, export
