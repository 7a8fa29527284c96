"""The layers point one way (the package docstring): every import of a module, at its top or inside a
function, names a module of its own layer or of one below; siblings (stats and eval) import neither each
other nor anything above. Read from the source with ast, so an import that runs only on some path is
checked too."""
import ast
from pathlib import Path

import mbmerge

ROOT = Path(mbmerge.__file__).parent
# bottom to top; a tuple is siblings. Each is a folder, but the library entry, one module (library.py).
LAYERS = ["common", "kernels", "methods", "engine", ("eval", "stats"), "library", "tune", "bin"]
RANK = {name: k for k, layer in enumerate(LAYERS) for name in (layer if isinstance(layer, tuple) else (layer,))}
WORKLOADS = ("mbmerge.eval.zoo", "mbmerge.eval.synthetic", "mbmerge.common.domains")


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


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "mbmerge" and len(parts) > 1 and parts[1] in RANK else None


def _modules():
    """(layer, path, module) of every module of every layer, sub-packages' too."""
    for layer in RANK:
        if (ROOT / f"{layer}.py").is_file():
            yield layer, ROOT / f"{layer}.py", f"mbmerge.{layer}"
            continue
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = ["mbmerge", *path.relative_to(ROOT).with_suffix("").parts]
            yield layer, path, ".".join(parts[:-1] if path.name == "__init__.py" else parts)


def _wrong_imports(wrong) -> list[str]:
    """'path:line imports name' of every import of a layer's module naming a layer that `wrong(its layer,
    the other)` says it must not."""
    found = []
    for layer, path, module in _modules():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for line, name in _imports(path, package):
            other = _layer(name)
            if other is not None and wrong(layer, other):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return found


def test_every_layer_is_a_folder_with_modules_or_the_library_module():
    assert all((ROOT / layer / "__init__.py").is_file() for layer in RANK if layer != "library")
    assert (ROOT / "library.py").is_file() and not (ROOT / "library").exists()


def test_imports_point_down_only():
    upward = _wrong_imports(lambda layer, other: RANK[other] > RANK[layer])
    assert not upward, "\n".join(upward)


def test_stats_and_eval_are_siblings_that_do_not_import_each_other():
    assert RANK["stats"] == RANK["eval"] < RANK["library"]
    across = _wrong_imports(lambda layer, other: layer != other and RANK[layer] == RANK[other])
    assert not across, "\n".join(across)


def test_the_library_entry_is_what_the_package_exports():
    assert mbmerge.merge.__module__ == mbmerge.collect_statistics.__module__ == "mbmerge.library"


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


def test_common_imports_no_torch_or_transformers_at_its_top():
    """Shared ground stays light: what stats and eval share (the zoo's domains, quieting transformers)
    imports the heavy libraries, if at all, inside the function that needs them."""
    heavy = ("torch", "transformers", "lm_eval", "numpy")
    found = []
    for path in (ROOT / "common").glob("*.py"):
        for node in ast.parse(path.read_text()).body:           # the module's top only, not its functions
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in heavy]
    assert not found, found


# engine/'s rooms, bottom to top (engine/__init__.py says what each owns); recipe/ stands beside them
ENGINE_ROOMS = [{"inputs"}, {"flags", "spec", "plan", "journal", "device"}, {"output"}, {"adapters", "transplant"},
                {"models", "modules"}, {"execute", "moe", "norms"}, {"api"}]


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["mbmerge", "engine"] and len(parts) > 2 else None


def test_the_engines_rooms_point_down_only_and_the_core_never_imports_the_recipe_room():
    order = {room: k for k, rooms in enumerate(ENGINE_ROOMS) for room in rooms}
    rooms = {p.stem if p.is_file() else p.name for p in (ROOT / "engine").iterdir()
             if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert set(order) | {"recipe"} == rooms
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
