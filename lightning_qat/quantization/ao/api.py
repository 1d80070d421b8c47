"""The torch.ao.quantization names lightning-qat uses, imported once, behind a clear error when torch drops them."""

from __future__ import annotations

import torch

from lightning_qat.quantization.ao.quiet import _silenced

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
    "FusedMovingAvgObsFakeQuantize",
    "PrepareCustomConfig",
    "QConfig",
    "QConfigMapping",
    "QuantStub",
    "_ConvBnNd",
    "_DynamicLinear",
    "_DynamicLinearReLU",
    "_Int8Conv2d",
    "_Int8Embedding",
    "_QATEmbedding",
    "_QATLinear",
    "_QATLinearReLU",
    "_convert_fx",
    "_eager_convert",
    "_eager_prepare",
    "_eager_prepare_qat",
    "_fuse_modules",
    "_fuse_modules_qat",
    "_prepare_ptq_fx",
    "_prepare_qat_fx",
    "default_embedding_qat_qconfig",
    "default_weight_fake_quant",
    "default_weight_observer",
    "float_qparams_weight_only_qconfig",
    "get_default_qat_qconfig",
    "get_default_qat_qconfig_mapping",
    "get_default_qconfig",
    "get_default_qconfig_mapping",
]
