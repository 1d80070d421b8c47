"""The package's layers import one way, downhill: module-level and function-level imports alike."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "lightning_qat"
# Each layer may import from itself and the layers before it, never after.
LAYERS = ["base", "quantization", "export", "lightning", "app"]
BASE = {"exceptions", "files", "choices"}  # import nothing of the package; every layer uses them
TOP = {"__init__", "__main__"}  # the public API and `python -m`: above every layer
# What a layer may import from outside the package beside the standard library (top-level names).
THIRD_PARTY = {
    "base": set(),
    # torchao: the [pt2e] extra, in quantization/pt2e.py only; executorch: [mobile], in quantization/xnnpack.py only
    "quantization": {"torch", "torchvision", "torchao", "executorch"},
    "export": {"torch", "torchvision", "numpy", "onnx", "onnxruntime", "executorch"},  # executorch: export/pte.py only
}


def layer_of(module: str) -> str:
    """``lightning_qat.quantization.ao`` -> ``quantization``; ``lightning_qat.files`` -> ``base``."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in TOP:
        return "top"
    return "base" if parts[1] in BASE else parts[1]


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (at module level or inside a function), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lightning_qat":  # `from lightning_qat import files` names a module (or the API)
                found += [(f"lightning_qat.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((node.module, node.lineno))
    return found


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported, _ in imports(path):
            if imported.startswith("lightning_qat"):
                while imported not in modules and "." in imported:  # `from pkg.mod import name`
                    imported = imported.rsplit(".", 1)[0]
                targets.add(imported)
        graph[name] = targets - {name}
    return graph


def refusals(graph: dict[str, set[str]], third_party: dict[str, list[str]]) -> list[str]:
    """What the layering forbids: an import uphill, a cycle, a foreign package a layer may not use."""
    order = {layer: i for i, layer in enumerate(LAYERS)} | {"top": len(LAYERS)}
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target.split(".")[:2] == module.split(".")[:2] and layer_of(module) != "base":
                continue  # within one layer package
            if order[layer_of(target)] > order[layer_of(module)] or (
                layer_of(module) == "base" and target != module and layer_of(target) == "base"
            ):
                found.append(f"{module} imports {target} ({layer_of(module)} -> {layer_of(target)})")
    for module, names in sorted(third_party.items()):
        allowed = THIRD_PARTY.get(layer_of(module))
        if allowed is not None:
            found += [f"{module} imports {name} ({layer_of(module)} layer)" for name in names if name not in allowed]
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def foreign_imports() -> dict[str, list[str]]:
    """Per module, the top-level names of what it imports from outside the package and the standard library."""
    import sys

    result = {}
    for path in PACKAGE.rglob("*.py"):
        names = {imported.split(".")[0] for imported, _ in imports(path)}
        result[module_name(path)] = sorted(
            n for n in names if n not in sys.stdlib_module_names and n not in ("lightning_qat", "__future__")
        )
    return result


def test_every_module_is_in_a_layer():
    unplaced = [m for m in package_graph() if layer_of(m) not in (*LAYERS, "top")]
    assert unplaced == []


def test_the_package_imports_one_way_downhill():
    assert refusals(package_graph(), foreign_imports()) == []


def test_the_quantization_layer_needs_only_torch():
    quantization = {m: names for m, names in foreign_imports().items() if layer_of(m) == "quantization"}
    assert quantization  # the layer exists and was read
    torchao = {m for m, names in quantization.items() if "torchao" in names}
    executorch = {m for m, names in foreign_imports().items() if "executorch" in names}
    # the one torchao seam (the optional PT2E engine) and ExecuTorch's two (its quantizer; its program and runtime)
    assert torchao == {"lightning_qat.quantization.pt2e"}
    assert executorch == {"lightning_qat.quantization.xnnpack", "lightning_qat.export.pte"}
    allowed = {"torch", "torchvision", "torchao", "executorch"}
    assert {name for names in quantization.values() for name in names} <= allowed


@pytest.mark.parametrize(
    ("graph", "third_party", "refused"),
    [
        ({"lightning_qat.quantization.ao": {"lightning_qat.lightning.callback"}}, {}, "quantization -> lightning"),
        ({"lightning_qat.export.onnx": {"lightning_qat.app.cli"}}, {}, "export -> app"),
        ({"lightning_qat.files": {"lightning_qat.exceptions"}}, {}, "base -> base"),
        ({"lightning_qat.lightning.callback": {"lightning_qat"}}, {}, "lightning -> top"),
        (
            {"lightning_qat.quantization.ao": set()},
            {"lightning_qat.quantization.ao": ["lightning"]},
            "imports lightning",
        ),
        (
            {
                "lightning_qat.lightning.a": {"lightning_qat.lightning.b"},
                "lightning_qat.lightning.b": {"lightning_qat.lightning.a"},
            },
            {},
            "import cycle",
        ),
    ],
)
def test_the_checks_refuse_what_the_layering_forbids(graph, third_party, refused):
    found = refusals(graph, third_party)
    assert any(refused in line for line in found), found


def test_an_import_inside_a_function_counts(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from lightning.pytorch import Trainer\n")
    assert imports(source) == [("lightning.pytorch", 2)]


def test_torch_ao_quantization_is_imported_by_its_seam_only():
    importing = {
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        for imported, _ in imports(path)
        if imported.startswith(("torch.ao.quantization", "torch.ao.nn"))
    }
    assert importing  # the seam was read
    assert {module.rsplit(".", 1)[0] for module in importing} == {"lightning_qat.quantization.ao"}


ENGINE_NAMES = {"fx", "eager", "pt2e"}


def engine_tests(path: Path) -> list[str]:
    """Comparisons of a value with an engine's name (``mode == "pt2e"``, ``mode in ("fx", "eager")``) in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        literals = [c.value for side in sides for c in ast.walk(side) if isinstance(c, ast.Constant)]
        if ENGINE_NAMES & {value for value in literals if isinstance(value, str)}:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_outside_the_engines_tests_an_engine_by_name():
    outside = [path for path in PACKAGE.rglob("*.py") if "engines" not in path.relative_to(PACKAGE).parts]
    assert len(outside) > 40  # the package was read
    assert [hit for path in outside for hit in engine_tests(path)] == []


def test_the_engine_name_check_sees_a_test_by_name(tmp_path):
    source = tmp_path / "branch.py"
    source.write_text('if prepared.mode == "pt2e":\n    pass\nok = mode in engines.ENGINES\n')
    assert engine_tests(source) == ["branch.py:1: prepared.mode == 'pt2e'"]
