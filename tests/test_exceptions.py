import inspect

import pytest

import lightning_qat
from lightning_qat import exceptions

BUILTIN = {
    "AccuracyBudgetError": RuntimeError,
    "ArtifactError": ValueError,
    "CheckpointError": ValueError,
    "ConversionError": RuntimeError,
    "EvaluationInterrupted": RuntimeError,
    "LightningInternalsError": RuntimeError,
    "NotAQATCheckpointError": ValueError,
    "NotTraceable": RuntimeError,
    "OnnxExtraMissing": ImportError,
    "PT2EUnavailable": ImportError,
    "PreflightError": ValueError,
}


def test_every_exception_class_is_listed():
    defined = {name for name, value in vars(exceptions).items() if inspect.isclass(value)}
    assert defined == set(exceptions.__all__) == set(BUILTIN)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_each_is_exported_documented_and_caught_as_its_builtin(name):
    cls = getattr(lightning_qat, name)
    assert cls is getattr(exceptions, name)
    assert name in lightning_qat.__all__
    assert issubclass(cls, BUILTIN[name])
    assert cls.__doc__.startswith("Raised ")  # says when


def test_no_other_module_defines_an_exception():
    """One module of exceptions: a class deriving from Exception anywhere else in the package is refused."""
    import ast
    from pathlib import Path

    package = Path(lightning_qat.__file__).parent
    elsewhere = []
    for path in package.rglob("*.py"):
        if path.name == "exceptions.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            bases = [getattr(b, "id", getattr(b, "attr", "")) for b in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and any(b.endswith(("Error", "Exception", "Missing")) for b in bases):
                elsewhere.append(f"{path.name}:{node.name}")
    assert elsewhere == []
