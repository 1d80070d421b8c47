import subprocess
import sys
import warnings

import torch

from lightning_qat import ao


def test_a_torch_without_the_quantization_api_fails_at_import_with_the_fix():
    """What a torch newer than the tested range would do once torch.ao.quantization is gone."""
    code = "import sys, torch; sys.modules['torch.ao.quantization'] = None; import lightning_qat"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "ImportError: lightning-qat needs torch.ao.quantization" in last
    assert f"torch {torch.__version__} does not provide it" in last
    assert "pip install 'torch<2.15'" in last


def test_quiet_silences_torch_quantization_deprecations_but_not_others():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ao.quiet():
            warnings.warn("torch.ao.quantization is deprecated and will be removed", DeprecationWarning, stacklevel=1)
            warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["an unrelated warning"]
