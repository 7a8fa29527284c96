"""The method contract (methods/contract.py) holds: each row's functions take only what the engine makes
available to them, the task-arithmetic members state their trim and election and get the family's apply
and fused path, every method has a library function that shadows no module, and method parameters never
collide with MergeSpec's fields."""
import importlib
import inspect
import subprocess
import sys
import types
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import mbmerge
from mbmerge import kernels, methods
from mbmerge.engine.spec import MergeSpec
from mbmerge.methods import REGISTRY
from mbmerge.methods.contract import CONTEXT, Method, Ref, TaskArithmetic
from mbmerge.methods.registry import SCALE, TOP_K, WEIGHTS

ROWS = sorted(REGISTRY)
MEMBERS = [n for n in ROWS if isinstance(REGISTRY[n].apply, TaskArithmetic)]
REDUCED = {"gain", "cos", "coef", "proj", "cut", "w"}            # what the reduce functions return


def required(ref: Ref) -> set[str]:
    """The keyword-only arguments of ref's function without a default."""
    return {p.name for p in inspect.signature(ref.fn).parameters.values() if p.kind is p.KEYWORD_ONLY
            and p.default is p.empty}


@pytest.mark.parametrize("name", ROWS)
def test_each_function_takes_only_what_its_row_makes_available(name):
    m = REGISTRY[name]
    params = {p.name for p in m.params}
    available = params | set(CONTEXT) | REDUCED
    own = m.apply.trim.torch if isinstance(m.apply, TaskArithmetic) else m.apply
    assert own is None or (callable(own.fn) and required(own) <= available), name
    if m.ranks:
        assert required(m.ranks) <= params | {"n"} and "thr" in m.apply.takes, name
    if m.reduce:
        assert required(m.reduce) <= params | set(CONTEXT) | {"chunks"}, name
    if isinstance(m.fused, Ref):
        assert "out_dtype" in m.fused.takes and required(m.fused) <= set(m.apply.takes) | {"out_dtype"}, name


@pytest.mark.parametrize("name", MEMBERS)
def test_task_arithmetic_members_state_their_trim_and_election(name):
    """A member's row has no apply of its own: its trim's functions, the family's arguments it elects with
    (consensus, aggregate) or sums with (normalize), and its module as the docs' section."""
    m = REGISTRY[name]
    params = {p.name for p in m.params}
    assert m.apply.elect == m.elect and m.apply.trim is m.trim and m.fused == m.apply.fused
    assert (m.ranks, m.reduce) == (m.trim.ranks, m.trim.reduce)
    assert ({"consensus", "aggregate"} <= params) == (m.elect == "sign") and "weights" in params
    assert not ({"consensus", "aggregate"} & params and "normalize" in params)
    if m.trim.torch:
        drawn = {"kept"} if m.trim.kind == "random" else set()     # the L1 pass's keep bits (dispatch.merge_chunk)
        assert set(m.trim.fused.takes) == set(m.trim.torch.takes) | drawn
        assert m.apply.fn.__module__ == f"mbmerge.methods.{m.trim.torch.module}"
    else:
        assert m.apply.fn.__module__ == "mbmerge.methods.task_vectors"


def test_a_new_member_is_a_row(monkeypatch):
    """magnitude pruning without election (TIES's trim, summed): b + lam * sum_i w_i trim(d_i), by the torch
    apply and by the fused kernel path (the compiled loops, where built) alike."""
    calls = []
    run = kernels.delta_merge
    monkeypatch.setattr(kernels, "delta_merge", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    row = Method(name="top_k_sum", summary="", paper="", params=(WEIGHTS, SCALE) + REGISTRY["ties"].params[1:2],
                 trim=TOP_K)
    b = torch.zeros(6)
    xs = [torch.tensor([1.0, -4.0, 0.5, 3.0, 0.0, -2.0]), torch.tensor([-0.5, 2.0, 5.0, -0.25, 1.0, 0.75])]
    p = methods.resolve_params(row, 2, {"weights": [1.0, 0.5], "density": 0.5, "scale": 2.0})
    want = 2 * (torch.tensor([0.0, -4.0, 0.0, 3.0, 0.0, -2.0]) + 0.5 * torch.tensor([0.0, 2.0, 5.0, 0.0, 1.0, 0.0]))
    for impl in ("torch", "auto"):
        with kernels.using(impl):
            reduced = methods.reductions(row, p, lambda: [(b, xs, 0)], "w", (6,))
            assert torch.equal(methods.apply_chunk(row, p, reduced, b, xs, 0, "w", (6,)), want), impl
    assert len(calls) == (1 if kernels.fused(torch.device("cpu")) else 0)


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
