"""ExecuTorch's XNNPACK quantizer for the PT2E capture; the one seam to ExecuTorch's quantization side.

ExecuTorch is an optional extra (``pip install 'lightning-qat[mobile]'``); nothing here imports it before it is asked
for. Its lowering to a ``.pte`` program and its runtime are the export layer's (:mod:`lightning_qat.export.pte`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from lightning_qat.exceptions import PT2EUnavailable

INSTALL_HINT = "pip install 'lightning-qat[mobile]'  (executorch 1.5, torch 2.14, torchao 0.18)"
BACKENDS = ("xnnpack",)


def missing() -> str | None:
    """Why ExecuTorch's XNNPACK flow cannot run here (no torchao PT2E flow, no ExecuTorch), or ``None``."""
    from lightning_qat.quantization import pt2e  # the capture and conversion are torchao's

    reason = pt2e.missing()
    if reason is not None:
        return reason
    if importlib.util.find_spec("executorch") is None:
        return f"ExecuTorch is not installed: {INSTALL_HINT}"
    return None


def require(what: str = "backend='xnnpack'") -> None:
    """Raise :class:`~lightning_qat.PT2EUnavailable` naming the fix unless the XNNPACK flow can run here."""
    reason = missing()
    if reason is not None:
        raise PT2EUnavailable(f"{what} cannot run: {reason}.")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence ExecuTorch's warnings (its runtime "experimental", its use of deprecated importlib calls) and torch's."""
    from lightning_qat.quantization import pt2e

    with pt2e.quiet(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This API is experimental")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*(read_text|open_text|read_binary)")
        yield


def quantizer(qat: bool, skip: Sequence[str] = ()) -> Any:
    """ExecuTorch's ``XNNPACKQuantizer``: symmetric per-channel int8 weights, int8 activations; ``skip`` left float.

    Its ``set_module_name`` takes no ``None`` (no "keep float"), so the modules of ``skip`` are left out by its filter.
    """
    from lightning_qat.quantization import pt2e

    require()
    with quiet():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

    found = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=qat))
    if skip:
        found.set_filter_function(pt2e.outside(skip))
    return found
