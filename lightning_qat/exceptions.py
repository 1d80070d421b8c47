"""Every exception lightning-qat raises on purpose, in one place; each is exported from ``lightning_qat``.

Each subclasses the builtin a caller would catch without knowing lightning-qat (``ValueError`` for bad input,
``RuntimeError`` for a run that cannot go on, ``ImportError`` for a missing extra), so ``except ValueError`` keeps
working. This module imports nothing: every layer may raise from it.
"""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's dispatcher errors list every backend after it)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


__all__ = [
    "AccuracyBudgetError",
    "ArtifactError",
    "CheckpointError",
    "ConversionError",
    "EvaluationInterrupted",
    "LightningInternalsError",
    "NotAQATCheckpointError",
    "NotTraceable",
    "OnnxExtraMissing",
    "PT2EUnavailable",
    "PreflightError",
]


class PreflightError(ValueError):
    """Raised in ``setup`` when the QAT run would fail later (at the end of fit, or at the first step).

    The message names the fix: a precision, a missing ``validation_step``, an example input that does not run, an
    int8 model that cannot convert or trace, an output directory that is taken, a layer ONNX cannot take.
    """


class ConversionError(RuntimeError):
    """Raised when the int8 conversion, or the int8 model's first forward pass, fails.

    The trained QAT model is untouched: conversion always works on a CPU copy.
    """


class NotAQATCheckpointError(ValueError):
    """Raised when a checkpoint given as a QAT checkpoint holds no ``QATCallback`` state: its network is float.

    By :func:`~lightning_qat.load_qat_checkpoint` and :func:`~lightning_qat.convert_checkpoint`; load such a
    checkpoint with ``load_from_checkpoint``.
    """


class CheckpointError(ValueError):
    """Raised when a checkpoint or weights file cannot be read as one: truncated, corrupted, or not a checkpoint.

    Also when a QAT checkpoint was prepared with other settings than the callback now has (``skip``, ``mode``, ...)
    or written by a newer lightning-qat, and when it holds Python objects that only a full unpickling (which can run
    code from the file) would load: lightning-qat loads checkpoints with ``weights_only=True``. The message names the
    file, or the setting that differs.
    """


class NotTraceable(RuntimeError):
    """Raised by an engine that cannot take the network: torch.fx cannot trace it, ``torch.export`` cannot capture it.

    ``engine="auto"`` then tries the next engine (FX, then PT2E, then eager); an engine named by ``engine=`` stops in
    ``setup`` with the reason. Nothing else falls back: a failure of lightning-qat's own passes is raised as it is,
    with the network restored.
    """


class OnnxExtraMissing(ImportError):
    """Raised when ONNX export or an ONNX artifact needs onnx / onnxruntime and they are not installed.

    The message gives the install command, ``pip install 'lightning-qat[onnx]'``.
    """


class PT2EUnavailable(ImportError):
    """Raised by ``engine="pt2e"`` (or a ``.pt2`` artifact) when torchao's PT2E flow cannot run here.

    torchao is not installed (``pip install 'lightning-qat[pt2e]'``), or torch is older than torchao needs.
    """


class LightningInternalsError(RuntimeError):
    """Raised when a private Lightning attribute lightning-qat relies on is gone (a Lightning release renamed it)."""


class EvaluationInterrupted(RuntimeError):
    """Raised when SIGTERM arrives while lightning-qat's own code runs: the preflight in ``setup``, or the end of fit.

    The run ends non-zero. At the end of fit, once the int8 artifact is on disk it is kept, and the report on disk says
    ``failed during evaluation``.
    """


class AccuracyBudgetError(RuntimeError):
    """Raised with ``on_drop="raise"`` when ``monitor`` drops from float to int8 by more than ``max_metric_drop``.

    Raised after everything is written: the trained QAT model, checkpoints, artifact and report are kept.
    """


class ArtifactError(ValueError):
    """Raised by :func:`~lightning_qat.load_quantized` for a file it cannot load as it was written.

    The file is not a lightning-qat artifact, is corrupted (its sha256 does not match), or was converted for a
    backend this machine cannot run.
    """
