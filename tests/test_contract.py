"""The method contract (methods/contract.py) holds: each row's stated arguments are exactly what its
functions take, the fused adapters take apply's arguments and out_dtype, every method has a library
function that shadows no module, and method parameters never collide with MergeSpec's fields."""
import importlib
import inspect
import subprocess
import sys
import types
from dataclasses import fields
from pathlib import Path

import pytest

import mbmerge
from mbmerge.engine.spec import MergeSpec
from mbmerge.methods import REGISTRY
from mbmerge.methods.contract import CONTEXT, step

ROWS = sorted(REGISTRY)


def keyword_only(fn) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


@pytest.mark.parametrize("name", ROWS)
def test_each_step_takes_what_its_function_takes(name):
    m = REGISTRY[name]
    for step in [m.apply, m.reduce, m.ranks]:
        if step is not None:
            assert set(step.takes) == keyword_only(step.fn), (name, step.fn.__name__)
    params = {p.name for p in m.params}
    reduced = {"gain", "cos", "coef", "proj", "cut", "w"}            # what the reduce functions return
    assert set(m.apply.takes) <= params | set(CONTEXT) | reduced, name
    if m.ranks:
        assert set(m.ranks.takes) <= params | {"n"} and "thr" in m.apply.takes, name


@pytest.mark.parametrize("name", [n for n in ROWS if REGISTRY[n].fused])
def test_fused_adapters_take_apply_arguments_and_out_dtype(name):
    m = REGISTRY[name]
    drawn = {"kept"} if m.trim == "random" else set()          # the L1 pass's keep bits (dispatch.merge_chunk)
    assert keyword_only(step(m.fused).fn) == set(m.apply.takes) | {"out_dtype"} | drawn


def test_every_method_is_a_library_function_and_every_module_a_module():
    for name in ROWS:
        fn = getattr(mbmerge.methods, name)
        assert callable(fn) and not isinstance(fn, types.ModuleType) and fn.__name__ == name
    folder = Path(mbmerge.methods.__file__).parent
    for path in folder.glob("*.py"):
        if path.stem != "__init__":
            module = importlib.import_module(f"mbmerge.methods.{path.stem}")
            assert isinstance(module, types.ModuleType) and path.stem not in REGISTRY


def test_the_table_and_the_command_line_import_no_torch():
    code = ("import sys; import mbmerge.bin.cli, mbmerge.methods.registry; "
            "sys.exit(any(m.split('.')[0] in ('torch', 'transformers', 'lm_eval') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("argv", [["--help"], ["methods"], ["--method", "nope", "--experts", "a", "--out", "o"],
                                  ["--method", "ties", "--experts", "a,b", "--density", "2", "--out", "o"],
                                  ["--method", "ties", "--base", "/no/base", "--experts", "/no/e", "--out", "o"],
                                  ["--method", "ties", "--base", "/", "--experts", "no such thing!", "--out", "o"],
                                  ["--method", "ties", "--experts", "/no/e", "--out", "o"]])
def test_help_the_table_and_the_errors_of_a_command_import_no_torch(argv, tmp_path):
    code = ("import sys; from mbmerge.bin.cli import main; sys.argv = ['mbmerge'] + sys.argv[1:]\n"
            "code = 0\ntry: main()\nexcept SystemExit as e: code = e.code or 0\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'lm_eval'}), code)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.splitlines()[-1] == ("[] 0" if argv in (["--help"], ["methods"]) else "[] 2"), done.stdout
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()


def test_method_parameters_are_not_merge_spec_fields():
    spec = {f.name for f in fields(MergeSpec)}
    assert not spec & {p.name for m in REGISTRY.values() for p in m.params}


def test_mergekit_grid_demo_and_bench_settings_are_parameters_of_their_method():
    for m in REGISTRY.values():
        params = {p.name for p in m.params}
        for settings in (m.grid or {}, m.demo, m.bench or {}):
            assert set(settings) <= params, m.name
