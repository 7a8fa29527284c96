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
    """(layer, path, module) of every module of every layer, sub-packages' too."""
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = ["mbmerge", *path.relative_to(ROOT).with_suffix("").parts]
            yield layer, path, ".".join(parts[:-1] if path.name == "__init__.py" else parts)


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


# engine/'s rooms, bottom to top (engine/__init__.py says what each owns); recipe/ stands beside them
ENGINE_ROOMS = [{"inputs"}, {"spec", "plan", "journal", "device"}, {"output"}, {"adapters"}, {"models"},
                {"execute"}, {"api"}]


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["mbmerge", "engine"] and len(parts) > 2 else None


def test_the_engines_rooms_point_down_only_and_the_core_never_imports_the_recipe_room():
    order = {room: k for k, rooms in enumerate(ENGINE_ROOMS) for room in rooms}
    assert set(order) | {"recipe"} == {p.stem if p.is_file() else p.name for p in (ROOT / "engine").iterdir()
                                       if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").is_file())}
    wrong = []
    for layer, path, module in _modules():
        room = _room(module)
        if layer != "engine" or room is None or room == "recipe":
            continue
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for line, name in _imports(path, package):
            other = _room(name)
            if other == "recipe" or (other in order and order[other] > order[room]):
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({room}) imports {name}")
    assert not wrong, "\n".join(wrong)
