"""The one seam to ``torch.ao.quantization``.

Every call into torch's (deprecated, still working) quantization stack goes through this package, inside
:func:`quiet`, so torch's deprecation warnings never reach users' logs or fail their ``-W error`` test runs (the
Lightning layer says once that they are silenced: :func:`first_notice`). Every read of a fake-quant module's or a
fused module's internals is here too (:func:`quant_grid`, :func:`observer_range`, :func:`fused_batch_norm`, ...).
When torch moves these APIs, this is the package to change. It imports torch only.

One module per concept: :mod:`.quiet` (warnings, the quantized engine), :mod:`.api` (the guarded imports),
:mod:`.fake_quant` (fake-quants that convert to what QAT trained), :mod:`.conv_bn` (fused Conv-BN with
running statistics), :mod:`.qconfigs`, :mod:`.kernels` (probes of this
CPU's int8 kernels), :mod:`.flow` (prepare / fuse / convert) and :mod:`.modules` (reading and switching QAT modules).
Callers use the package's names (``ao.quiet()``, ``ao.convert_fx``), never the modules'.
"""

from lightning_qat.quantization.ao.api import DeQuantStub, FakeQuantizeBase, QConfig, QConfigMapping, QuantStub
from lightning_qat.quantization.ao.conv_bn import fold_frozen_batch_norm, unfold_batch_norm
from lightning_qat.quantization.ao.fake_quant import Int8RangeFakeQuantize, WeightFakeQuantize
from lightning_qat.quantization.ao.flow import (
    convert_eager,
    convert_fx,
    fuse_modules,
    prepare_eager,
    prepare_fx,
    qconfig_of,
    set_qconfig,
)
from lightning_qat.quantization.ao.kernels import (
    TRANSPOSED_CONVS,
    DepthwiseShape,
    depthwise_saturation,
    depthwise_shape,
    depthwise_slowdown,
    depthwise_warning,
    describe_depthwise,
    fastest,
    is_depthwise,
    transposed_conv_int8_works,
    transposed_conv_warning,
)
from lightning_qat.quantization.ao.modules import (
    QuantGrid,
    dynamic_linear,
    dynamic_linear_type,
    fake_quant_modules,
    freeze_bn_stats,
    fused_batch_norm,
    has_fused_relu,
    hold_eval,
    int8_embedding,
    int8_weight,
    is_conv_bn_qat,
    is_fake_quant,
    is_fused_module,
    is_qat_module,
    is_quantized_module,
    observer_range,
    output_fake_quant,
    pause_observers,
    quant_grid,
    restore_observers,
    set_activation_fake_quant,
    set_observer_range,
    set_observers,
    to_float,
    uncalibrated,
    weight_fake_quant,
)
from lightning_qat.quantization.ao.qconfigs import (
    embedding_qconfig,
    per_tensor_weight_qconfig,
    qconfig,
    qconfig_mapping,
)
from lightning_qat.quantization.ao.quiet import engine, first_notice, quiet

__all__ = [
    "TRANSPOSED_CONVS",
    "DeQuantStub",
    "DepthwiseShape",
    "FakeQuantizeBase",
    "Int8RangeFakeQuantize",
    "QConfig",
    "QConfigMapping",
    "QuantGrid",
    "QuantStub",
    "WeightFakeQuantize",
    "convert_eager",
    "convert_fx",
    "depthwise_saturation",
    "depthwise_shape",
    "depthwise_slowdown",
    "depthwise_warning",
    "describe_depthwise",
    "dynamic_linear",
    "dynamic_linear_type",
    "embedding_qconfig",
    "engine",
    "fake_quant_modules",
    "fastest",
    "first_notice",
    "fold_frozen_batch_norm",
    "freeze_bn_stats",
    "fuse_modules",
    "fused_batch_norm",
    "int8_weight",
    "has_fused_relu",
    "hold_eval",
    "int8_embedding",
    "is_conv_bn_qat",
    "is_depthwise",
    "is_fake_quant",
    "is_fused_module",
    "is_qat_module",
    "is_quantized_module",
    "observer_range",
    "output_fake_quant",
    "pause_observers",
    "per_tensor_weight_qconfig",
    "prepare_eager",
    "prepare_fx",
    "qconfig",
    "qconfig_mapping",
    "qconfig_of",
    "quant_grid",
    "quiet",
    "restore_observers",
    "set_activation_fake_quant",
    "set_observer_range",
    "set_observers",
    "set_qconfig",
    "to_float",
    "transposed_conv_int8_works",
    "transposed_conv_warning",
    "uncalibrated",
    "unfold_batch_norm",
    "weight_fake_quant",
]
