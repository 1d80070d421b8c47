"""Quantization backends: names, availability on this machine, and the default choice.

``x86`` / ``fbgemm`` / ``qnnpack`` are torch's quantized engines (``torch.backends.quantized``); ``xnnpack`` is
ExecuTorch's CPU delegate, for phones (qnnpack's successor): torch runs no int8 kernel of its own for it, the
``.pte`` program runs in ExecuTorch's runtime (the XNNPACK engine checks that ExecuTorch is installed).
"""

from __future__ import annotations

import platform
from typing import Literal, get_args

import torch

Backend = Literal["x86", "fbgemm", "qnnpack", "xnnpack"]
BACKENDS: tuple[str, ...] = get_args(Backend)
EXECUTORCH_BACKENDS = ("xnnpack",)  # not torch's engines: their artifact runs in ExecuTorch's runtime
TORCH_BACKENDS = tuple(name for name in BACKENDS if name not in EXECUTORCH_BACKENDS)

_ARM_MACHINES = ("arm64", "aarch64", "armv7l", "armv8l")


def default_backend() -> str:
    """``x86`` on x86-64 machines, ``qnnpack`` on ARM; the first supported one otherwise."""
    preferred = "qnnpack" if platform.machine().lower() in _ARM_MACHINES else "x86"
    supported = supported_backends()
    if preferred in supported:
        return preferred
    if not supported:
        raise RuntimeError(
            f"This torch build ({torch.__version__}) supports none of the quantized engines {list(TORCH_BACKENDS)}; "
            f"torch.backends.quantized.supported_engines is {engines()}."
        )
    return supported[0]


def engines() -> list[str]:
    """The quantized engines this torch build supports on this CPU (``torch.backends.quantized``)."""
    return list(torch.backends.quantized.supported_engines)


def supported_backends() -> list[str]:
    """The backends of :data:`BACKENDS` that this torch build can run."""
    available = set(engines())
    return [name for name in BACKENDS if name in available]


def torch_engine(backend: str) -> str | None:
    """The ``torch.backends.quantized`` engine running ``backend``'s int8 kernels (``None``: ExecuTorch's backends)."""
    return None if backend in EXECUTORCH_BACKENDS else backend


def resolve_backend(backend: str | None) -> str:
    """Validate ``backend`` (``None`` picks :func:`default_backend`) and return its name.

    Raises:
        ValueError: if ``backend`` is not one of :data:`BACKENDS` or this machine's torch cannot run it.
    """
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"Unknown quantization backend {backend!r}; valid backends are {list(BACKENDS)}.")
    if torch_engine(backend) is not None and backend not in engines():
        raise ValueError(
            f"Quantization backend {backend!r} is not supported by this torch build on this machine; "
            f"supported here: {supported_backends()}."
        )
    return backend
