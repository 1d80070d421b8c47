import importlib.metadata
import sys
from pathlib import Path

import tomllib

import lightning_qat


def test_the_version_has_one_source():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert lightning_qat.__version__ == importlib.metadata.version("lightning-qat") == pyproject["project"]["version"]
    init = (Path(lightning_qat.__file__)).read_text()
    assert pyproject["project"]["version"] not in init  # not written a second time


def test_the_public_api_imports_and_ships_type_information():
    for name in lightning_qat.__all__:
        assert getattr(lightning_qat, name) is not None
    assert (Path(lightning_qat.__file__).parent / "py.typed").is_file()


def test_importing_the_quantization_layer_loads_no_lightning():
    import subprocess

    code = (
        "import sys, lightning_qat.quantization.prepare, lightning_qat.export.onnx; print('lightning' in sys.modules)"
    )
    # the package's __init__ loads the Lightning layer; load the layer modules without it, as a torch-only user would
    stub = "import sys, types; sys.modules['lightning_qat'] = types.ModuleType('lightning_qat'); "
    stub += f"sys.modules['lightning_qat'].__path__ = [{str(Path(lightning_qat.__file__).parent)!r}]; "
    result = subprocess.run([sys.executable, "-c", stub + code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
