"""The layers point one way (the package docstring): every import of a module, at its top or inside a
function, names a module of its own layer or of one below. Read from the source with ast, so an import
that runs only on some path is checked too."""
import ast
from pathlib import Path

import mbmerge

ROOT = Path(mbmerge.__file__).parent
LAYERS = ["common", "kernels", "methods", "engine", "eval", "stats", "tune", "bin"]   # bottom to top
WORKLOADS = ("mbmerge.eval.zoo", "mbmerge.eval.synthetic")


def _imports(path: Path, package: str):
    """(line, imported module) of every import in a module file, relative imports made absolute."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{a.name}") for a in node.names)  # `from . import x`


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if parts[0] == "mbmerge" and len(parts) > 1 and parts[1] in LAYERS else None


def _modules():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).glob("*.py")):
            package = f"mbmerge.{layer}"
            yield layer, path, package if path.name == "__init__.py" else f"{package}.{path.stem}"


def test_every_layer_is_a_folder_with_modules():
    assert all((ROOT / layer / "__init__.py").is_file() for layer in LAYERS)


def test_imports_point_down_only():
    upward = []
    for layer, path, module in _modules():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for line, name in _imports(path, package):
            other = _layer(name)
            if other is not None and other > LAYERS.index(layer):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not upward, "\n".join(upward)


def test_the_engine_and_methods_import_no_workload():
    found = [f"{path.relative_to(ROOT)}:{line} imports {name}" for layer, path, module in _modules()
             if layer in ("common", "kernels", "methods", "engine")
             for line, name in _imports(path, module.rpartition(".")[0] if path.name != "__init__.py" else module)
             if name.startswith(WORKLOADS)]
    assert not found, "\n".join(found)


def test_common_imports_nothing_of_mbmerge():
    for path in (ROOT / "common").glob("*.py"):
        package = "mbmerge.common"
        assert all(not name.startswith("mbmerge.") or name.startswith("mbmerge.common")
                   for _, name in _imports(path, package)), path
