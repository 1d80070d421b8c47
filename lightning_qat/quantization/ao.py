"""The one seam to ``torch.ao.quantization``.

Every call into torch's (deprecated, still working) quantization stack goes through this file, inside
:func:`quiet`, so torch's deprecation warnings never reach users' logs or fail their ``-W error`` test runs (the
Lightning layer says once that they are silenced: :func:`first_notice`). Every read of a fake-quant module's or a
fused module's internals is here too (:func:`quant_grid`, :func:`observer_range`, :func:`fused_batch_norm`, ...).
When torch moves these APIs, this is the file to change. It imports torch only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import time
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import nn

from lightning_qat.quantization import pt2e

_NOTICE = (
    "lightning-qat uses torch.ao.quantization (deprecated by torch in favour of torchao, still supported in "
    "torch {version}); torch's deprecation warnings for it are silenced."
)
_notice_shown = False
_lock = threading.Lock()

# Messages torch emits from its quantization stack; matched as regular expressions at the start of the message.
_SILENCED = (
    r"torch\.ao\.quantization is deprecated",
    r"Please use quant_min and quant_max",
    r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
    r"must run observer before calling calculate_qparams",
    r"`torch\.jit\.",
    r"torch\.jit\.",
    r"Converting a tensor to a Python",
)


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _SILENCED:
            warnings.filterwarnings("ignore", message=message)
        yield


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch's quantization deprecation warnings for the block."""
    with _silenced():
        yield


def first_notice() -> str | None:
    """The one-line notice that torch's quantization warnings are silenced: the first call's, ``None`` after."""
    global _notice_shown
    with _lock:
        if _notice_shown:
            return None
        _notice_shown = True
    return _NOTICE.format(version=torch.__version__)


_TESTED_TORCH = "2.4 to 2.14"

try:
    with _silenced():
        from torch.ao.nn.intrinsic.qat import LinearReLU as _QATLinearReLU
        from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd
        from torch.ao.nn.intrinsic.quantized.dynamic import LinearReLU as _DynamicLinearReLU
        from torch.ao.nn.qat import Embedding as _QATEmbedding
        from torch.ao.nn.qat import Linear as _QATLinear
        from torch.ao.nn.quantized import Conv2d as _Int8Conv2d
        from torch.ao.nn.quantized import Embedding as _Int8Embedding
        from torch.ao.nn.quantized.dynamic import Linear as _DynamicLinear
        from torch.ao.quantization import (
            DeQuantStub,
            QConfig,
            QConfigMapping,
            QuantStub,
            default_embedding_qat_qconfig,
            default_weight_fake_quant,
            default_weight_observer,
            float_qparams_weight_only_qconfig,
            get_default_qat_qconfig,
            get_default_qat_qconfig_mapping,
            get_default_qconfig,
            get_default_qconfig_mapping,
        )
        from torch.ao.quantization import convert as _eager_convert
        from torch.ao.quantization import fuse_modules as _fuse_modules
        from torch.ao.quantization import fuse_modules_qat as _fuse_modules_qat
        from torch.ao.quantization import prepare as _eager_prepare
        from torch.ao.quantization import prepare_qat as _eager_prepare_qat
        from torch.ao.quantization.fake_quantize import FakeQuantizeBase, FusedMovingAvgObsFakeQuantize
        from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
        from torch.ao.quantization.quantize_fx import convert_fx as _convert_fx
        from torch.ao.quantization.quantize_fx import prepare_fx as _prepare_ptq_fx
        from torch.ao.quantization.quantize_fx import prepare_qat_fx as _prepare_qat_fx
except ImportError as err:  # torch removed (part of) its eager/FX quantization stack
    raise ImportError(
        f"lightning-qat needs torch.ao.quantization's eager and FX QAT API, tested on torch {_TESTED_TORCH}; "
        f"torch {torch.__version__} does not provide it ({err}). Install a supported torch: pip install 'torch<2.15'."
    ) from err

__all__ = [
    "DeQuantStub",
    "FakeQuantizeBase",
    "Int8RangeFakeQuantize",
    "WeightFakeQuantize",
    "QConfig",
    "QConfigMapping",
    "QuantStub",
    "convert_eager",
    "convert_fx",
    "engine",
    "fake_quant_modules",
    "freeze_bn_stats",
    "fuse_modules",
    "is_conv_bn_qat",
    "is_fake_quant",
    "is_quantized_module",
    "TRANSPOSED_CONVS",
    "transposed_conv_warning",
    "transposed_conv_int8_works",
    "depthwise_saturation",
    "depthwise_warning",
    "is_depthwise",
    "depthwise_shape",
    "depthwise_slowdown",
    "describe_depthwise",
    "first_notice",
    "QuantGrid",
    "quant_grid",
    "observer_range",
    "set_observer_range",
    "fused_batch_norm",
    "has_fused_relu",
    "weight_fake_quant",
    "output_fake_quant",
    "is_fused_module",
    "per_tensor_weight_qconfig",
    "prepare_eager",
    "prepare_fx",
    "qconfig",
    "qconfig_mapping",
    "embedding_qconfig",
    "quiet",
    "set_observers",
    "set_activation_fake_quant",
    "uncalibrated",
    "pause_observers",
    "restore_observers",
    "set_qconfig",
    "qconfig_of",
    "is_qat_module",
    "dynamic_linear",
    "dynamic_linear_type",
    "int8_embedding",
    "to_float",
]


@contextlib.contextmanager
def engine(backend: str) -> Iterator[None]:
    """Run the block with ``torch.backends.quantized.engine`` set to ``backend``, then restore it."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class Int8RangeFakeQuantize(FusedMovingAvgObsFakeQuantize):
    """An activation fake-quant with a reduced-range (7-bit) scale that clamps where the int8 model does: 8 bits.

    x86 and fbgemm observe activations with ``reduce_range=True``: the scale maps the observed range onto [0, 127],
    so the int8 kernels' products cannot saturate on CPUs without VNNI. torch's fake-quant then also clamps at 127,
    but the converted int8 model quantizes into quint8's full [0, 255] with that scale (and so does an ONNX
    QuantizeLinear): a value above the observed range is clamped in QAT and kept in int8. This fake-quant observes
    and picks its scale exactly as torch's does (same observer, same buffers, same checkpoints) and clamps to the
    dtype's full range, so the QAT network computes the function its artifacts compute.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the clamp; the observer keeps its reduced range, from which the scale is computed
        self.quant_min, self.quant_max = _FULL_RANGE[self.dtype]

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Observe (the 7-bit scale), then fake-quantize over the full 8-bit range.

        torch's ``FakeQuantize.forward`` would clamp to the observer's reduced range, its fused kernel too.
        """
        if bool(self.observer_enabled[0]):
            self.activation_post_process(X.detach())
            scale, zero_point = self.calculate_qparams()
            self.scale.resize_(scale.shape).copy_(scale)
            self.zero_point.resize_(zero_point.shape).copy_(zero_point)
        if bool(self.fake_quant_enabled[0]):
            X = torch.fake_quantize_per_tensor_affine(X, self.scale, self.zero_point, self.quant_min, self.quant_max)
        return X


_FULL_RANGE = {torch.quint8: (0, 255), torch.qint8: (-128, 127)}


class WeightFakeQuantize(FusedMovingAvgObsFakeQuantize):
    """torch's fused weight fake-quant, converted to int8 with the scale QAT trained with.

    Its fused kernel picks a symmetric scale as ``max|w| / 127`` (torch's C++ qparams, which preserve sparsity), while
    the observer's ``calculate_qparams``, which torch's int8 conversion reads, gives ``max|w| / 127.5`` (our ONNX
    export reads the trained scale). So torch converts every weight onto a grid 0.4% finer than the one QAT trained
    on, up to a step off per weight, which the layers after compound: timm's mobilenetv3 in the test zoo was 18.7%
    off QAT with 77.8% top-1 agreement (regnety 7.2%, 97.4%); with the trained scale, 0.0% and 100%. Here
    ``calculate_qparams`` returns the scale and zero point the forward uses (and checkpoints hold), once the observer
    has seen weights.
    """

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """The scale and zero point of the last forward pass: what QAT trained with."""
        low = self.activation_post_process.min_val
        assert isinstance(low, torch.Tensor)
        if low.numel() == 0 or not bool(torch.isfinite(low).all()):  # never observed: torch's own
            return super().calculate_qparams()
        return self.scale.clone(), self.zero_point.clone()


def _int8_range(config: QConfig | None) -> QConfig | None:
    """``config`` with the fake-quants whose int8 conversion computes what QAT trained.

    A reduced-range activation fake-quant becomes :class:`Int8RangeFakeQuantize`, torch's fused weight fake-quant
    :class:`WeightFakeQuantize` (same arguments, observers, buffers and checkpoint keys).
    """
    if config is None:
        return config
    activation, weight = config.activation, config.weight
    partial = getattr(activation, "p", None)  # torch's `with_args` wrapper
    if partial is not None and partial.func is FusedMovingAvgObsFakeQuantize and partial.keywords.get("reduce_range"):
        activation = Int8RangeFakeQuantize.with_args(**partial.keywords)
    partial = getattr(weight, "p", None)
    if partial is not None and partial.func is FusedMovingAvgObsFakeQuantize:
        weight = WeightFakeQuantize.with_args(**partial.keywords)
    return QConfig(activation=activation, weight=weight)


def qconfig(backend: str, qat: bool = True) -> QConfig:
    """The backend's default QAT (or post-training) qconfig: per-channel weights where the backend has them.

    QAT activations of a reduced-range backend clamp to 8 bits (:class:`Int8RangeFakeQuantize`).
    """
    with quiet():
        if not qat:
            return get_default_qconfig(backend)
        config = _int8_range(get_default_qat_qconfig(backend))
    assert config is not None
    return config


def per_tensor_weight_qconfig(backend: str, qat: bool = True) -> QConfig:
    """The backend's qconfig with per-tensor weights (transposed convolutions have no per-channel int8 kernels)."""
    base = qconfig(backend, qat)
    with quiet():
        weight = default_weight_fake_quant if qat else default_weight_observer
    return QConfig(activation=base.activation, weight=weight)


TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@functools.cache
def transposed_conv_int8_works(backend: str) -> bool:
    """Whether this torch's int8 ConvTranspose2d computes what the float one does on ``backend`` (checked once).

    Measured on an AVX-512 x86 CPU: the x86 engine is off by over 100% (torch 2.4.1 and 2.14.1), fbgemm too on
    torch 2.14.1 (right on 2.4.1); qnnpack is within 1%.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 16, 4, 4, generator=generator)
    conv = nn.ConvTranspose2d(16, 8, 2, stride=2)
    model = nn.Sequential(QuantStub(), conv, DeQuantStub()).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
        expected = model(x)
        set_qconfig(model, per_tensor_weight_qconfig(backend, qat=False))
        try:
            with engine(backend), quiet():
                prepared = _eager_prepare(model)
                prepared(x)
                actual = _eager_convert(prepared)(x)
        except Exception:  # noqa: BLE001 - an engine without the kernel: it does not work
            return False
    return bool((actual - expected).abs().mean() <= 0.05 * expected.abs().mean())


def transposed_conv_warning(backend: str) -> str:
    """What to tell the user when ConvTranspose layers stay float on ``backend``."""
    return (
        f"QAT: ConvTranspose layers stay float: torch {torch.__version__}'s int8 transposed convolution on the "
        f"{backend!r} engine does not compute what the float layer does on this CPU (checked at start). "
        "backend='qnnpack' quantizes them correctly."
    )


def is_depthwise(module: nn.Module) -> bool:
    """A 2-d convolution with one input channel per group (MobileNet, EfficientNet, SSDlite backbones)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


@functools.cache
def depthwise_saturation(backend: str) -> int:
    """How many output steps this torch's int8 depthwise 3x3 convolution is off on ``backend`` (checked once).

    ``x86``/``fbgemm`` observe activations with a 7-bit scale so that a kernel multiplying uint8 activations by int8
    weights in int16 pairs cannot saturate; a value above the observed range still quantizes to 128-255. Measured
    on an AVX-512 VNNI CPU with torch 2.14.1: ``fbgemm``'s depthwise kernel is then off by about 40 steps, ``x86``
    and ``qnnpack`` by 0. Returns 0 when the kernel is right (or missing: nothing to warn about).
    """
    generator = torch.Generator().manual_seed(0)
    channels = 16
    activations = torch.randint(128, 256, (1, channels, 6, 6), generator=generator) * 0.05
    sign = torch.where(torch.rand(channels, 1, 1, 1, generator=generator) > 0.5, 1.0, -1.0)
    weight = torch.randint(100, 128, (channels, 1, 3, 3), generator=generator) * sign * 0.01
    with engine(backend), quiet():
        try:
            conv, weight_q = _int8_depthwise(weight, padding=1)
            x = torch.quantize_per_tensor(activations, 0.05, 0, torch.quint8)
            reference = nn.functional.conv2d(x.dequantize(), weight_q.dequantize(), padding=1, groups=channels)
            scale = float(reference.abs().max()) / 120
            expected = torch.quantize_per_tensor(reference, scale, 128, torch.quint8).dequantize()
            conv.scale, conv.zero_point = scale, 128
            actual = conv(x).dequantize()
        except Exception:  # noqa: BLE001 - an engine without the kernel
            return 0
    return round(float((actual - expected).abs().max()) / scale)


DepthwiseShape = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def depthwise_shape(module: nn.Module) -> DepthwiseShape | None:
    """(kernel, stride, padding, dilation) of a depthwise convolution; ``None`` for any other module."""
    if not is_depthwise(module):
        return None
    conv = module
    assert isinstance(conv, nn.Conv2d)
    padding = conv.padding if isinstance(conv.padding, tuple) else (0, 0)  # "same"/"valid" strings: as torch's own
    return tuple(conv.kernel_size), tuple(conv.stride), tuple(padding), tuple(conv.dilation)


@functools.cache
def depthwise_slowdown(backend: str, shape: DepthwiseShape) -> float:
    """How many times slower this torch's int8 depthwise convolution of ``shape`` is than float (measured once).

    ``x86`` and ``fbgemm`` have fast depthwise kernels only for some shapes; the others take a generic path. Measured
    on an AVX-512 VNNI CPU with torch 2.14.1 (128 channels, 24x24 maps, 1 thread): 3x3 and 5x5 with the usual padding
    0.6-0.9x the float time; strided without padding (TensorFlow's "same" padding made static, timm's ``tf_``
    networks) 13-34x; dilated (DeepLab's and LR-ASPP's MobileNetV3) 52-125x. ``qnnpack``: 1.3-4x for all of them.
    One such layer can make a whole int8 network slower than float (LR-ASPP MobileNetV3: 0.23x).
    """
    kernel, stride, padding, dilation = shape
    channels = 128
    size = [24 + (k - 1) * d for k, d in zip(kernel, dilation, strict=True)]  # small maps hide the gap
    conv = nn.Conv2d(channels, channels, kernel, stride, padding, dilation, groups=channels).eval()  # type: ignore[arg-type]
    x = torch.rand(1, channels, *size)
    try:
        with engine(backend), quiet(), torch.no_grad():
            int8, _ = _int8_depthwise(conv.weight, stride=stride, padding=padding, dilation=dilation)
            x_q = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
            int8_time, float_time = _fastest((int8, x_q), (conv, x))
            return int8_time / float_time
    except Exception:  # noqa: BLE001 - an engine without the kernel: nothing to keep float for speed
        return 1.0


def _int8_depthwise(weight: torch.Tensor, **conv: Any) -> tuple[_Int8Conv2d, torch.Tensor]:
    """An int8 depthwise ``Conv2d`` (``conv``: its stride, padding, dilation) of ``weight`` at scale 0.01 per channel.

    Returns the layer and its quantized weight.
    """
    channels = weight.shape[0]
    weight_q = torch.quantize_per_channel(
        weight, torch.full((channels,), 0.01), torch.zeros(channels, dtype=torch.long), 0, torch.qint8
    )
    layer = _Int8Conv2d(channels, channels, tuple(weight.shape[2:]), groups=channels, **conv)
    layer.set_weight_bias(weight_q, None)
    return layer, weight_q


def describe_depthwise(shape: DepthwiseShape) -> str:
    """``5x5, stride 2, padding 0`` (and the dilation when there is one)."""
    kernel, stride, padding, dilation = shape
    text = f"{'x'.join(map(str, kernel))}, stride {'x'.join(map(str, set(stride)))}, padding "
    text += "x".join(map(str, set(padding)))
    return text + (f", dilation {'x'.join(map(str, set(dilation)))}" if any(d > 1 for d in dilation) else "")


def _fastest(*calls: tuple[nn.Module, torch.Tensor], repeats: int = 10) -> list[float]:
    """The fastest of ``repeats`` runs of each ``(layer, input)``, run in turns so a busy moment hits all of them."""
    times: list[list[float]] = [[] for _ in calls]
    for round_ in range(3 + repeats):  # 3 warm-up rounds
        for i, (layer, x) in enumerate(calls):
            start = time.perf_counter()
            layer(x)
            if round_ >= 3:
                times[i].append(time.perf_counter() - start)
    return [min(t) for t in times]


def depthwise_warning(backend: str, count: int) -> str:
    """What to tell the user when ``backend``'s depthwise kernel saturates and the network has ``count`` of them."""
    return (
        f"QAT: backend {backend!r}: torch {torch.__version__}'s int8 depthwise convolution saturates on this CPU when "
        f"an activation exceeds its observed range (checked at start: {depthwise_saturation(backend)} quantization "
        f"steps off), so the int8 model can compute other values than QAT in depthwise convolutions ({count} here). "
        "backend='x86' (the default) computes them exactly on this CPU."
    )


def embedding_qconfig(qat: bool = True) -> QConfig:
    """The weight-only qconfig torch has for ``nn.Embedding``: per-row float scale and offset; the ids stay integer."""
    with quiet():
        return default_embedding_qat_qconfig if qat else float_qparams_weight_only_qconfig


def qconfig_mapping(
    backend: str, skip: Sequence[str] = (), qat: bool = True, float_types: Sequence[type[nn.Module]] = ()
) -> QConfigMapping:
    """The backend's default FX mapping (QAT or post-training), with ``skip`` module names kept in float.

    ``nn.Embedding`` gets torch's weight-only qconfig (float qparams per row; its input is integer token ids).
    ``float_types`` stay float (e.g. ConvTranspose layers where :func:`transposed_conv_int8_works` says no).
    """
    with quiet():
        mapping = get_default_qat_qconfig_mapping(backend) if qat else get_default_qconfig_mapping(backend)
    if qat:  # reduced-range activations clamp to 8 bits, as the int8 model does (Int8RangeFakeQuantize)
        mapping.set_global(_int8_range(mapping.global_qconfig))
        for object_type, config in list(mapping.object_type_qconfigs.items()):
            mapping.set_object_type(object_type, _int8_range(config))
    mapping.set_object_type(nn.Embedding, embedding_qconfig(qat))
    for module_type in float_types:
        mapping.set_object_type(module_type, None)
    for name in skip:
        mapping.set_module_name(name, None)
    return mapping


def prepare_fx(
    module: nn.Module,
    mapping: QConfigMapping,
    example_inputs: tuple[Any, ...],
    qat: bool = True,
    leaf_classes: Sequence[type[nn.Module]] = (),
) -> torch.fx.GraphModule:
    """Symbolically trace, fuse and insert fake-quant (QAT) or observers (post-training), FX graph mode.

    ``leaf_classes`` are not traced into: they stay modules (in float), called as such.
    """
    config = PrepareCustomConfig().set_non_traceable_module_classes(list(leaf_classes))
    with quiet():
        prepare = _prepare_qat_fx if qat else _prepare_ptq_fx
        return prepare(module, mapping, example_inputs=example_inputs, prepare_custom_config=config)


def prepare_eager(module: nn.Module, qat: bool = True) -> nn.Module:
    """Swap eager modules with a ``qconfig`` for their QAT versions (or add observers), in place."""
    with quiet():
        return _eager_prepare_qat(module, inplace=True) if qat else _eager_prepare(module, inplace=True)


def fuse_modules(module: nn.Module, groups: list[list[str]], qat: bool = True) -> nn.Module:
    """Fuse each group of module names (Conv+BN(+ReLU), Linear(+ReLU)) in place."""
    with quiet():
        if qat:
            return _fuse_modules_qat(module, groups, inplace=True)
        return _fuse_modules(module, groups, inplace=True)


def convert_fx(module: nn.Module, float_nodes: Collection[str] = ()) -> torch.fx.GraphModule:
    """FX-prepared QAT model -> int8 model; the graph nodes named in ``float_nodes`` stay float.

    A float node's QAT layer becomes its float form (BatchNorm folded); a fake-quant between float nodes only (its
    producer and every user) disappears, one with an int8 side becomes a quantize / dequantize. ``module`` is changed.

    Raises:
        TypeError: if ``module`` is not an FX-prepared ``GraphModule``.
    """
    if not isinstance(module, torch.fx.GraphModule):
        raise TypeError(f"convert_fx needs an FX-prepared GraphModule, got {type(module).__name__}.")
    if float_nodes:  # torch's convert reads each node's qconfig from what prepare recorded; None keeps it float
        attrs = copy.copy(module.meta["_observed_graph_module_attrs"])
        attrs.node_name_to_qconfig = {
            name: None if name in float_nodes else config for name, config in attrs.node_name_to_qconfig.items()
        }
        module.meta["_observed_graph_module_attrs"] = attrs
    with quiet():
        return _convert_fx(module)


def qconfig_of(module: nn.Module) -> QConfig | None:
    """The ``qconfig`` eager mode reads from ``module`` (``None``: float, or none set)."""
    qconfig = getattr(module, "qconfig", None)
    return qconfig if isinstance(qconfig, QConfig) else None


def set_qconfig(module: nn.Module, qconfig: QConfig | None) -> None:
    """Give ``module`` (and, through eager ``prepare``, its children) the ``qconfig`` eager mode reads; None: float."""
    module.qconfig = qconfig  # type: ignore[assignment]  # torch.ao reads this attribute


def convert_eager(module: nn.Module) -> nn.Module:
    """Eager-prepared QAT model -> int8 model, in place."""
    with quiet():
        return _eager_convert(module, inplace=True)


def fake_quant_modules(module: nn.Module) -> list[tuple[str, FakeQuantizeBase]]:
    """All fake-quantize modules with their qualified names (torch.ao's, and torchao's in a PT2E network)."""
    return [(name, m) for name, m in module.named_modules() if is_fake_quant(m)]


def is_fake_quant(module: nn.Module) -> TypeGuard[FakeQuantizeBase]:
    """Whether ``module`` is a fake-quantize module: torch.ao's, or torchao's (the same interface, PT2E's copy)."""
    torchao_base = pt2e.fake_quant_base()
    return isinstance(module, FakeQuantizeBase) or (torchao_base is not None and isinstance(module, torchao_base))


def uncalibrated(module: nn.Module) -> list[str]:
    """Names of the fake-quant modules of ``module`` whose observer never saw data (scale still the initial 1.0)."""
    names = []
    for name, fq in fake_quant_modules(module):
        observer = getattr(fq, "activation_post_process", None)
        if isinstance(observer, nn.Module) and hasattr(observer, "min_val"):
            low = _tensor(observer, "min_val")
            if low.numel() == 0 or not bool(torch.isfinite(low).all()):
                names.append(name)
    return names


def set_observers(module: nn.Module, enabled: bool) -> None:
    """Enable or disable every observer of ``module`` (fake quantization itself stays on)."""
    for _, fq in fake_quant_modules(module):
        fq.enable_observer(enabled)


def set_activation_fake_quant(module: nn.Module, enabled: bool) -> None:
    """Switch the fake quantization of every activation of ``module`` on or off (weights' stays, observers observe)."""
    for name, fq in fake_quant_modules(module):
        if not name.endswith("weight_fake_quant"):
            fq.enable_fake_quant(enabled)


def pause_observers(module: nn.Module) -> list[dict[str, Any]]:
    """Switch the observers of ``module`` off and return what :func:`restore_observers` needs to undo it exactly.

    An observer that never saw data stays on: its fake quantization cannot run before the observer has given the
    scales their shape (a per-row embedding weight before the first training step, in Lightning's sanity check).
    :func:`restore_observers` puts its state back too, so the evaluation leaves no trace either way.
    """
    fake_quants = fake_quant_modules(module)
    saved = [copy.deepcopy(fq.state_dict()) for _, fq in fake_quants]
    never = set(uncalibrated(module))
    for name, fq in fake_quants:
        if name not in never:
            fq.disable_observer()
    return saved


def restore_observers(module: nn.Module, saved: list[dict[str, Any]]) -> None:
    """Put back the fake-quant state :func:`pause_observers` saved (observer flags and statistics alike)."""
    for (_, fq), state in zip(fake_quant_modules(module), saved, strict=True):
        fq.load_state_dict(state)


def freeze_bn_stats(module: nn.Module) -> None:
    """Freeze the statistics of every BatchNorm in ``module``: they stop moving and normalize from now on.

    Fused Conv-BN(-ReLU) and Linear-BN QAT modules switch to their running statistics (torch's ``freeze_bn_stats``);
    standalone BatchNorm layers run in eval mode from their next forward on, whatever ``train()`` says later.
    """
    fused = [m for m in module.modules() if _is_fused_bn(m)]
    with quiet():
        for m in fused:
            m.freeze_bn_stats()  # type: ignore[operator]  # _is_fused_bn checked it is callable
    inside_fused = {id(fused_batch_norm(m)) for m in fused}
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in inside_fused:
            if not getattr(m, "_lightning_qat_frozen", False):
                m.register_forward_pre_hook(_batch_norm_in_eval)
                setattr(m, "_lightning_qat_frozen", True)  # noqa: B010 - a flag of ours on torch's module
            m.training = False


def _is_fused_bn(module: nn.Module) -> bool:
    """A fused Conv-BN or Linear-BN QAT module (it has a ``bn`` and can freeze it)."""
    return callable(getattr(module, "freeze_bn_stats", None)) and isinstance(getattr(module, "bn", None), nn.Module)


def _batch_norm_in_eval(module: nn.Module, args: tuple[Any, ...]) -> None:
    module.training = False  # a frozen standalone BatchNorm: running statistics, whatever train() set


def is_conv_bn_qat(module: nn.Module) -> bool:
    """Whether ``module`` is a fused Conv-BN(-ReLU) QAT module (the ones whose BN can be frozen)."""
    return isinstance(module, _ConvBnNd)


def is_quantized_module(module: nn.Module) -> bool:
    """Whether ``module`` is a converted (int8) module of torch's quantized namespaces."""
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


def is_fused_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch's fused modules (Conv-BN(-ReLU), Linear-ReLU, ...), float, QAT or int8."""
    return type(module).__module__.startswith("torch.ao.nn.intrinsic")


def weight_fake_quant(module: nn.Module) -> FakeQuantizeBase | None:
    """The weight fake-quant of a QAT Conv / Linear / Embedding module, ``None`` for other modules."""
    fake_quant = getattr(module, "weight_fake_quant", None)
    return fake_quant if isinstance(fake_quant, FakeQuantizeBase) else None


def output_fake_quant(module: nn.Module) -> FakeQuantizeBase | None:
    """The output fake-quant an eager-mode QAT layer carries as its child (called by a forward hook), else ``None``."""
    fake_quant = getattr(module, "activation_post_process", None)
    return fake_quant if isinstance(fake_quant, FakeQuantizeBase) else None


def fused_batch_norm(module: nn.Module) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm a fused Conv-BN / Linear-BN QAT module holds (to fold or freeze), else ``None``."""
    bn = getattr(module, "bn", None)
    return bn if isinstance(bn, nn.modules.batchnorm._BatchNorm) else None


def has_fused_relu(module: nn.Module) -> bool:
    """Whether a fused QAT module applies a ReLU after its conv / linear (ConvReLU2d, ConvBnReLU2d, LinearReLU)."""
    return is_fused_module(module) and "ReLU" in type(module).__name__


@dataclass(frozen=True)
class QuantGrid:
    """The grid a fake-quant module rounds to: its current scale and zero point, range, and channel axis."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    axis: int | None  # the channel axis of a per-channel quantizer; None for per-tensor
    float_qparams: bool  # per-row float scale and offset (embedding weights): no integer zero point


def quant_grid(fake_quant: FakeQuantizeBase) -> QuantGrid | None:
    """The :class:`QuantGrid` of ``fake_quant``; ``None`` when its fake quantization is switched off."""
    if not bool(fake_quant.fake_quant_enabled[0]):
        return None
    qscheme = getattr(fake_quant, "qscheme")  # noqa: B009 - plain attributes of torch's FakeQuantize
    per_channel = qscheme in (
        torch.per_channel_affine,
        torch.per_channel_symmetric,
        torch.per_channel_affine_float_qparams,
    )
    return QuantGrid(
        scale=_tensor(fake_quant, "scale"),
        zero_point=_tensor(fake_quant, "zero_point"),
        quant_min=int(getattr(fake_quant, "quant_min")),  # noqa: B009
        quant_max=int(getattr(fake_quant, "quant_max")),  # noqa: B009
        axis=int(getattr(fake_quant, "ch_axis")) if per_channel else None,  # noqa: B009
        float_qparams=qscheme == torch.per_channel_affine_float_qparams,
    )


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor attribute (buffer or parameter) ``name`` of ``module``."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is a {type(value).__name__}, not a tensor.")
    return value


def observer_range(fake_quant: FakeQuantizeBase) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The running (min, max) of ``fake_quant``'s observer while it observes and has seen data, else ``None``."""
    observer = getattr(fake_quant, "activation_post_process", None)
    if not isinstance(observer, nn.Module) or not hasattr(observer, "min_val"):
        return None
    low, high = _tensor(observer, "min_val"), _tensor(observer, "max_val")
    if not bool(fake_quant.observer_enabled[0]) or low.numel() == 0:
        return None
    return low, high


@torch.no_grad()
def set_observer_range(fake_quant: FakeQuantizeBase, low: torch.Tensor, high: torch.Tensor) -> None:
    """Set the observer's running (min, max) and recompute ``fake_quant``'s scale and zero point from them."""
    observer = fake_quant.activation_post_process
    assert isinstance(observer, nn.Module)
    for name, value in (("min_val", low), ("max_val", high)):
        current = _tensor(observer, name)
        current.copy_(value.view_as(current))
    with quiet():  # from the new range (a WeightFakeQuantize's own would return its current scale)
        scale, zero_point = observer.calculate_qparams()  # type: ignore[operator]
    _tensor(fake_quant, "scale").resize_(scale.shape).copy_(scale)
    _tensor(fake_quant, "zero_point").resize_(zero_point.shape).copy_(zero_point)


def is_qat_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch's QAT modules (a layer with its weight fake-quant: Linear, Conv-BN...)."""
    return type(module).__module__.startswith(("torch.ao.nn.qat", "torch.ao.nn.intrinsic.qat"))


def to_float(module: nn.Module) -> nn.Module:
    """The float module a QAT module stands for (BatchNorm folded into the conv / linear), with its trained weights."""
    with quiet():
        return module.to_float()  # type: ignore[operator]  # every torch QAT module has it


def dynamic_linear_type(module: nn.Module) -> bool:
    """Whether :func:`dynamic_linear` takes ``module`` (a QAT ``Linear`` or ``LinearReLU``)."""
    return type(module) in (_QATLinear, _QATLinearReLU)


@torch.no_grad()
def dynamic_linear(module: nn.Module) -> nn.Module | None:
    """A QAT ``Linear`` / ``LinearReLU`` as torch's dynamic int8 Linear, ``None`` for other modules.

    Its weights are quantized on the grid its weight fake-quant trained with (its ``calculate_qparams``, which
    :class:`WeightFakeQuantize` keeps equal to the forward's); activations are quantized per batch at run time.
    """
    if not dynamic_linear_type(module):
        return None
    fake_quant = weight_fake_quant(module)
    assert fake_quant is not None
    weight = _tensor(module, "weight").detach().float()
    bias = _tensor(module, "bias").detach().float() if getattr(module, "bias", None) is not None else None
    with quiet():
        scale, zero_point = fake_quant.calculate_qparams()
    axis = getattr(fake_quant, "ch_axis", 0) if scale.numel() > 1 else None
    if axis is None:
        int8 = torch.quantize_per_tensor(weight, float(scale), int(zero_point), torch.qint8)
    else:
        int8 = torch.quantize_per_channel(weight, scale.double(), zero_point.long(), int(axis), torch.qint8)
    cls = _DynamicLinearReLU if type(module) is _QATLinearReLU else _DynamicLinear
    with quiet():
        dynamic = cls(weight.shape[1], weight.shape[0], bias is not None, dtype=torch.qint8)  # `bias_` / `bias`
        dynamic.set_weight_bias(int8, bias)
    return dynamic


def int8_embedding(module: nn.Module) -> nn.Module | None:
    """A QAT ``Embedding`` as torch's weight-only int8 Embedding (float out), ``None`` for other modules."""
    if type(module) is not _QATEmbedding:
        return None
    fake_quant = weight_fake_quant(module)
    assert fake_quant is not None
    with quiet(), torch.no_grad():  # not from_float: torch 2.4's wants an activation observer on the QAT module
        scale, offset = fake_quant.calculate_qparams()
        weight = torch.quantize_per_channel(  # float zero points: per-row scale and offset
            _tensor(module, "weight").detach().float(), scale.float(), offset.float(), 0, torch.quint8
        )
        int8 = _Int8Embedding(weight.shape[0], weight.shape[1], padding_idx=getattr(module, "padding_idx", None))
        int8.set_weight(weight)
    return int8
