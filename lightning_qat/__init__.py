"""lightning-qat: quantization-aware training as a drop-in PyTorch Lightning callback.

The package is four layers, each importing only those below it: :mod:`lightning_qat.quantization` (torch only:
prepare, convert, schedule, observer sync, the torch.ao and torch-version seams), :mod:`lightning_qat.export`
(TorchScript and ONNX artifacts), :mod:`lightning_qat.lightning` (the callback, the end-of-fit pipeline, evaluation,
report, preflight, checkpoints) and :mod:`lightning_qat.app` (the CLI, the embedded digits data and models, image
folders). :mod:`lightning_qat.exceptions`, :mod:`lightning_qat.files` and :mod:`lightning_qat.choices` import nothing
of the package and serve every layer.
"""

from importlib.metadata import PackageNotFoundError, version

from lightning_qat.exceptions import (
    AccuracyBudgetError,
    ArtifactError,
    CheckpointError,
    ConversionError,
    EvaluationInterrupted,
    LightningInternalsError,
    NotAQATCheckpointError,
    NotTraceable,
    OnnxExtraMissing,
    PreflightError,
    PT2EUnavailable,
)
from lightning_qat.export.torchscript import load_quantized
from lightning_qat.lightning.callback import QATCallback
from lightning_qat.lightning.checkpoint import load_qat_checkpoint
from lightning_qat.lightning.convert_checkpoint import analyze_checkpoint, convert_checkpoint
from lightning_qat.lightning.finish import FinishPipeline
from lightning_qat.lightning.report import QATReport

try:
    __version__ = version("lightning-qat")  # the one source: pyproject.toml's [project] version
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AccuracyBudgetError",
    "ArtifactError",
    "CheckpointError",
    "ConversionError",
    "EvaluationInterrupted",
    "FinishPipeline",
    "LightningInternalsError",
    "NotAQATCheckpointError",
    "NotTraceable",
    "OnnxExtraMissing",
    "PT2EUnavailable",
    "PreflightError",
    "QATCallback",
    "QATReport",
    "__version__",
    "analyze_checkpoint",
    "convert_checkpoint",
    "load_qat_checkpoint",
    "load_quantized",
]
