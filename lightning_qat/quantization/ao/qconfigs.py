"""The qconfigs and FX qconfig mappings of each backend, with :mod:`.fake_quant`'s fake-quants."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_qat.quantization.ao.api import (
    QConfig,
    QConfigMapping,
    default_embedding_qat_qconfig,
    default_weight_fake_quant,
    default_weight_observer,
    float_qparams_weight_only_qconfig,
    get_default_qat_qconfig,
    get_default_qat_qconfig_mapping,
    get_default_qconfig,
    get_default_qconfig_mapping,
)
from lightning_qat.quantization.ao.fake_quant import _int8_range
from lightning_qat.quantization.ao.quiet import quiet


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
