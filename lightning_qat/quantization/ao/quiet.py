"""Silencing torch's quantization deprecation warnings, the one notice that they are, and the quantized engine."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

import torch

from lightning_qat.quantization.backends import EXECUTORCH_BACKENDS

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


@contextlib.contextmanager
def engine(backend: str) -> Iterator[None]:
    """Run the block with ``torch.backends.quantized.engine`` set to ``backend``, then restore it.

    ExecuTorch's backends (``xnnpack``) are no engine of torch's: the block runs with the engine as it is.
    """
    previous = torch.backends.quantized.engine
    if backend not in EXECUTORCH_BACKENDS:
        torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
