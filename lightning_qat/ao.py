"""The one seam to ``torch.ao.quantization``.

Every call into torch's (deprecated, still working) quantization stack goes through this file, inside
:func:`quiet`, so torch's deprecation warnings become a single notice from us and never reach users' logs or
fail their ``-W error`` test runs. When torch moves these APIs, this is the file to change.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

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
    """Silence torch's quantization deprecation warnings, after saying once that we do."""
    from lightning.pytorch.utilities import rank_zero_info  # here: importing this module checks torch first

    global _notice_shown
    with _lock:
        if not _notice_shown:
            _notice_shown = True
            rank_zero_info(_NOTICE.format(version=torch.__version__))
    with _silenced():
        yield


_TESTED_TORCH = "2.4 to 2.14"

try:
    with _silenced():
        from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd
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
        from torch.ao.quantization.fake_quantize import FakeQuantizeBase
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
    "keep_transposed_conv_float",
    "per_tensor_weight_qconfig",
    "prepare_eager",
    "prepare_fx",
    "qconfig",
    "qconfig_mapping",
    "quiet",
    "set_observers",
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


def qconfig(backend: str, qat: bool = True) -> QConfig:
    """The backend's default QAT (or post-training) qconfig: per-channel weights where the backend has them."""
    with quiet():
        return get_default_qat_qconfig(backend) if qat else get_default_qconfig(backend)


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
    model = nn.Sequential(QuantStub(), nn.ConvTranspose2d(16, 8, 2, stride=2), DeQuantStub()).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(model[1].weight.shape, generator=generator) * 0.1)
        expected = model(x)
        model.qconfig = per_tensor_weight_qconfig(backend, qat=False)
        try:
            with engine(backend), quiet():
                prepared = _eager_prepare(model)
                prepared(x)
                actual = _eager_convert(prepared)(x)
        except Exception:  # noqa: BLE001 - an engine without the kernel: it does not work
            return False
    return bool((actual - expected).abs().mean() <= 0.05 * expected.abs().mean())


def keep_transposed_conv_float(backend: str) -> bool:
    """Keep ConvTranspose layers in float on ``backend`` (its int8 kernel is wrong here), saying so once."""
    if transposed_conv_int8_works(backend):
        return False
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(
        f"QAT: ConvTranspose layers stay float: torch {torch.__version__}'s int8 transposed convolution on the "
        f"{backend!r} engine does not compute what the float layer does on this CPU (checked at start). "
        "backend='qnnpack' quantizes them correctly."
    )
    return True


def qconfig_mapping(
    backend: str, skip: Sequence[str] = (), qat: bool = True, float_types: Sequence[type[nn.Module]] = ()
) -> QConfigMapping:
    """The backend's default FX mapping (QAT or post-training), with ``skip`` module names kept in float.

    ``nn.Embedding`` gets torch's weight-only qconfig (float qparams per row; its input is integer token ids).
    ``float_types`` stay float (e.g. ConvTranspose layers where :func:`keep_transposed_conv_float` says so).
    """
    with quiet():
        mapping = get_default_qat_qconfig_mapping(backend) if qat else get_default_qconfig_mapping(backend)
        embedding = default_embedding_qat_qconfig if qat else float_qparams_weight_only_qconfig
    mapping.set_object_type(nn.Embedding, embedding)
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
) -> nn.Module:
    """Symbolically trace, fuse and insert fake-quant (QAT) or observers (post-training), FX graph mode.

    ``leaf_classes`` are not traced into: they stay modules (in float), called as such.
    """
    config = PrepareCustomConfig().set_non_traceable_module_classes(list(leaf_classes))
    with quiet():
        if qat:
            return _prepare_qat_fx(module, mapping, example_inputs=example_inputs, prepare_custom_config=config)
        return _prepare_ptq_fx(module, mapping, example_inputs=example_inputs, prepare_custom_config=config)


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


def convert_fx(module: nn.Module) -> nn.Module:
    """FX-prepared QAT model -> int8 model."""
    with quiet():
        return _convert_fx(module)


def convert_eager(module: nn.Module) -> nn.Module:
    """Eager-prepared QAT model -> int8 model, in place."""
    with quiet():
        return _eager_convert(module, inplace=True)


def fake_quant_modules(module: nn.Module) -> list[tuple[str, FakeQuantizeBase]]:
    """All fake-quantize modules with their qualified names."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, FakeQuantizeBase)]


def is_fake_quant(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch's fake-quantize modules."""
    return isinstance(module, FakeQuantizeBase)


def set_observers(module: nn.Module, enabled: bool) -> None:
    """Enable or disable every observer of ``module`` (fake quantization itself stays on)."""
    for _, fq in fake_quant_modules(module):
        fq.enable_observer(enabled)


def freeze_bn_stats(module: nn.Module) -> None:
    """Freeze the statistics of every BatchNorm in ``module``: they stop moving and normalize from now on.

    Fused Conv-BN(-ReLU) and Linear-BN QAT modules switch to their running statistics (torch's ``freeze_bn_stats``);
    standalone BatchNorm layers run in eval mode from their next forward on, whatever ``train()`` says later.
    """
    fused = [m for m in module.modules() if _is_fused_bn(m)]
    with quiet():
        for m in fused:
            m.freeze_bn_stats()
    inside_fused = {id(m.bn) for m in fused}
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in inside_fused:
            if not getattr(m, "_lightning_qat_frozen", False):
                m.register_forward_pre_hook(_batch_norm_in_eval)
                m._lightning_qat_frozen = True
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
