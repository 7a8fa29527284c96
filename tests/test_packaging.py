"""A release install ships the whole package: the wheel built from this tree holds every subpackage
(every folder with an __init__.py) and the `mbmerge` command, and each subpackage imports."""
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

TREE = Path(__file__).resolve().parents[1]


def _tree_packages() -> set[str]:
    return {f"mbmerge.{'.'.join(p.parent.relative_to(TREE).parts)}" for p in TREE.rglob("__init__.py")
            if p.parent != TREE and not any(x in ("tests", "build") or x.startswith(".") for x in p.relative_to(TREE).parts)}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel of a copy of the tree (a build writes build/ and *.egg-info beside its sources)."""
    src, out = tmp_path_factory.mktemp("src") / "mbmerge", tmp_path_factory.mktemp("wheel")
    shutil.copytree(TREE, src, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "tests"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return zipfile.ZipFile(next(out.glob("mbmerge-*.whl")))


def test_the_wheel_holds_every_subpackage_of_the_tree(wheel):
    shipped = {str(Path(n).parent).replace("/", ".") for n in wheel.namelist() if n.endswith("/__init__.py")}
    assert {"mbmerge.tune", "mbmerge.stats", "mbmerge.common"} <= _tree_packages()
    assert _tree_packages() - shipped == set()
    assert not any(n.startswith(("mbmerge/tests/", "tests/")) for n in wheel.namelist())


def test_the_wheel_declares_the_command(wheel):
    entry = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
    assert "mbmerge = mbmerge.bin.cli:main" in wheel.read(entry).decode()


def test_every_subpackage_of_the_installed_package_imports():
    for name in sorted(_tree_packages()):
        importlib.import_module(name)
