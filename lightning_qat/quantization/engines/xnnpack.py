"""The XNNPACK engine, for phones: the PT2E capture, ExecuTorch's XNNPACK quantizer, a ``.pte`` program.

qnnpack's successor. Training, BatchNorm handling and conversion are the PT2E engine's (torchao's
``prepare_qat_pt2e`` / ``convert_pt2e`` on the same captured graph); the quantizer is ExecuTorch's
(:mod:`lightning_qat.quantization.xnnpack`) and the artifact is an ExecuTorch program lowered to the XNNPACK delegate
(:mod:`lightning_qat.export.pte`).
"""

from __future__ import annotations

from lightning_qat.quantization import xnnpack
from lightning_qat.quantization.engines.pt2e import PT2E


class XNNPACK(PT2E):
    """The PT2E engine with ExecuTorch's XNNPACK quantizer: per-channel symmetric int8 weights, int8 activations.

    Static activations only (the ``.pte`` runs XNNPACK's int8 kernels end to end); the accuracy-budget search is not
    offered: its groups follow the x86 quantizer's fusions, and XNNPACK's annotate other patterns.
    """

    name = "xnnpack"
    formats = ("pte",)
    backends = xnnpack.BACKENDS
    searchable = False
    dynamic = False
    conversion_hint = " ExecuTorch's XNNPACK quantizer annotated this graph; backend='x86' may take the network."

    def check(self, backend: str) -> None:
        """Raise unless ExecuTorch (and torchao's PT2E flow) is installed here and ``backend`` is ``"xnnpack"``.

        Raises:
            PT2EUnavailable: without ExecuTorch or torchao, or on a torch older than torchao needs.
            ValueError: for a backend other than ``"xnnpack"``.
        """
        xnnpack.require()
        super().check(backend)

    def can_search(self, dynamic: bool) -> bool:
        """Never: see the class."""
        return False
