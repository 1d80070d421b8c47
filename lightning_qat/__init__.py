"""lightning-qat: quantization-aware training as a drop-in PyTorch Lightning callback."""

from lightning_qat import ao  # noqa: F401 - first: a torch without torch.ao.quantization fails here, clearly
from lightning_qat.callbacks.qat import QATCallback
from lightning_qat.checkpoint import convert_checkpoint, load_qat_checkpoint
from lightning_qat.convert import load_quantized
from lightning_qat.report import QATReport

__version__ = "0.1.0"

__all__ = ["QATCallback", "QATReport", "__version__", "convert_checkpoint", "load_qat_checkpoint", "load_quantized"]
