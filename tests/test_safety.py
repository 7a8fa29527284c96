"""Never destroy a user's files, never publish a broken model (issue 16), from the user's side: the
`mbmerge` command in a temporary folder, every file checked before and after."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import read_model, write_model


def tree(root: Path) -> dict:
    """{path: bytes} of every file under root (hidden temporaries included)."""
    return {p: p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def refused(result, *fragments):
    code, out, err = result
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mbmerge: error: "), err
    assert all(f in lines[0] for f in fragments), lines[0]


@pytest.fixture
def project(family, tmp_path):
    """P/ with a base, two experts and a notes file, copied from the test family."""
    p = tmp_path / "P"
    for name, src in [("base", "base"), ("e0", "math"), ("e1", "code")]:
        shutil.copytree(family["paths"][src], p / name)
    (p / "notes.txt").write_text("my notes\n")
    return p


def ties(p: Path, out, *extra):
    return ["--method", "ties", "--base", p / "base", "--experts", f"{p / 'e0'},{p / 'e1'}", "--out", out, *extra]


# --- the output never overlaps an input; --overwrite replaces only mbmerge's own output ----------

@pytest.mark.parametrize("out, overwrite, record, why", [
    ("P", True, False, "holds files mbmerge did not write"),     # the case: P holds the inputs and notes
    ("P", True, True, "contains base"),                          # ... even when P has an mbmerge.json
    ("P/base", True, True, "is base"), ("P/e0/merged", False, False, "is inside expert"),
    ("P/e1", True, True, "is expert")])
def test_an_output_on_an_input_is_refused_and_no_byte_changes(project, tmp_path, run_main, out, overwrite, record,
                                                              why):
    if record:   # looks like an earlier merge's output listing every file in it as its own, so only the
        folder = tmp_path / out    # inputs' protection can refuse it
        files = [str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()] + ["mbmerge.json"]
        (folder / "mbmerge.json").write_text(json.dumps({"mbmerge_version": "0.1.0", "method": "ties", "files": files}))
    before = tree(tmp_path)
    refused(run_main(*ties(project, tmp_path / out, *(["--overwrite"] if overwrite else []))), why, "choose an")
    assert tree(tmp_path) == before


def test_overwrite_replaces_only_an_earlier_mbmerge_output(project, tmp_path, run_main):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("do not delete")
    before = tree(tmp_path)
    refused(run_main(*ties(project, mine, "--overwrite")), "holds files mbmerge did not write")
    assert tree(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_main(*ties(project, empty, "--overwrite", "-q"))[0] == 0 and (empty / "mbmerge.json").is_file()
    old = tree(empty)
    assert run_main(*ties(project, empty, "--overwrite", "-q", "--density", "0.5"))[0] == 0
    assert tree(empty) != old and json.loads((empty / "mbmerge.json").read_text())["params"]["density"] == [0.5, 0.5]


OVERFLOW = ["--method", "linear", "--weights", "3e38,3e38", "--no-normalize", "-q"]    # 3e38 x + 3e38 x = inf for x ~ 1


def test_a_failed_merge_leaves_the_output_it_would_replace_intact(project, tmp_path, run_main):
    out = tmp_path / "out"
    assert run_main(*ties(project, out, "-q"))[0] == 0
    before = tree(tmp_path)
    # finite inputs and parameters, an output that overflows: refused, and the old output stays
    refused(run_main(*OVERFLOW, "--experts", f"{project / 'e0'},{project / 'e1'}", "--out", out, "--overwrite"),
            "merged tensor", "NaN or Inf", "--allow-nonfinite")
    assert tree(tmp_path) == before


# --- parameters and merged values that are not finite ------------------------------------------

@pytest.mark.parametrize("method, weights, why", [
    ("ties", "nan,1", "weights='nan' must be a finite number"),
    ("task_arithmetic", "1,inf", "weights='inf' must be a finite number"),
    ("linear", "0,0", "weights 0.0,0.0 sum to 0"), ("linear", "1,-1", "weights 1.0,-1.0 sum to 0")])
def test_weights_that_make_nan_are_refused(project, tmp_path, run_main, method, weights, why):
    p = project
    args = ["--method", method, "--experts", f"{p / 'e0'},{p / 'e1'}", "--weights", weights, "--out", tmp_path / "o"]
    refused(run_main(*args, *(["--base", p / "base"] if method != "linear" else [])), why)
    assert not (tmp_path / "o").exists()


def test_a_non_finite_merge_names_the_tensor_and_publishes_nothing_unless_allowed(project, tmp_path, run_main):
    out = tmp_path / "o"
    args = [*OVERFLOW, "--experts", f"{project / 'e0'},{project / 'e1'}", "--out", out]
    refused(run_main(*args), "method linear: merged tensor model.", "holds NaN or Inf")
    assert not out.exists() and not list(tmp_path.glob(".o.mbmerge-*"))
    assert run_main(*args, "--allow-nonfinite", "-q")[0] == 0
    assert any(not torch.isfinite(t.float()).all() for t in read_model(out).values())


# --- side files are parsed before merging, recorded, and verified ------------------------------

def test_a_broken_base_config_is_refused_before_merging(project, tmp_path, run_main):
    (project / "base" / "config.json").write_text("{not json")
    refused(run_main(*ties(project, tmp_path / "o")), "config.json: not valid JSON", "fix or remove it")
    assert not (tmp_path / "o").exists()
    (project / "base" / "config.json").write_text(json.dumps({"hidden_size": 32}))
    refused(run_main(*ties(project, tmp_path / "o")), "config.json: not a model config")


def test_side_files_are_recorded_and_verified(project, tmp_path, run_main):
    out = tmp_path / "o"
    assert run_main(*ties(project, out, "-q"))[0] == 0
    digests = json.loads((out / "mbmerge.json").read_text())["sha256"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(digests)
    assert run_main("verify", out)[0] == 0
    (out / "tokenizer_config.json").write_text("{broken")
    code, stdout, err = run_main("verify", out)
    assert code != 0 and "tokenizer_config.json: not valid JSON" in stdout + err
    assert "tokenizer_config.json: sha256" in stdout + err


# --- output locations that cannot hold a folder: one line, before any input is read -----------

def test_output_under_a_file_or_a_virtual_path_is_one_line(project, tmp_path, run_main, monkeypatch):
    (tmp_path / "some_file").write_text("x")
    read = []
    monkeypatch.setattr("mbmerge.engine.inputs.index.TensorIndex.from_folder", lambda *a, **k: read.append(a))
    refused(run_main(*ties(project, tmp_path / "some_file" / "x")), "some_file is a file, not a folder")
    refused(run_main(*ties(project, tmp_path / "some_file")), "is a file, not a folder")
    refused(run_main(*ties(project, "/proc/mbmerge-test/out")), "cannot create")
    assert read == [] and (tmp_path / "some_file").read_text() == "x"


def test_output_dot_is_the_current_folder(project, tmp_path, run_main, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run_main(*ties(project, ".", "-q"))[0] == 0
    assert (tmp_path / "work" / "mbmerge.json").is_file() and len(read_model(tmp_path / "work")) == 21
    monkeypatch.chdir(project)      # the inputs are under the current folder: refused
    refused(run_main(*ties(project, ".", "--overwrite")), "holds files mbmerge did not write")
    refused(run_main(*ties(project, ".")), "already exists and is not empty")


# --- a method that fails on a tensor says which --------------------------------------------------

def test_svd_survives_low_rank_and_repeated_singular_values_when_lapack_fails(monkeypatch):
    from mbmerge.methods import svd
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, **k: _fail() if a.dtype == torch.float32 else real(a, **k))
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(576, 64, generator=g))
    cases = [torch.randn(64, 2, generator=g) @ torch.randn(2, 576, generator=g),       # rank 2
             2.0 * q1[:, :8] @ q2[:, :8].T,                                              # 8 equal singular values
             torch.zeros(64, 576)]
    for a in cases:
        u, s, vh = svd._svd(a)
        assert u.dtype == a.dtype and torch.allclose((u * s) @ vh, a, atol=1e-5)
        assert torch.allclose(u.T @ u, torch.eye(64), atol=1e-5) and torch.allclose(vh @ vh.T, torch.eye(64), atol=1e-5)
        assert torch.allclose(s, torch.linalg.svdvals(a.double()).float(), atol=1e-5)
    b = torch.zeros(64, 576)
    for method in ("iso_c", "iso_cts", "tsv"):
        out = getattr(__import__("mbmerge").methods, method)(b, [b + cases[0] * 1e-3, b + cases[1] * 1e-3, b])
        assert torch.isfinite(out).all()


def _fail():
    raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")


def test_a_failing_method_is_one_line_naming_method_and_tensor(project, tmp_path, run_main, monkeypatch):
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: _fail())
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: _fail())
    args = ["--method", "iso_c", "--base", project / "base", "--experts", f"{project / 'e0'},{project / 'e1'}"]
    refused(run_main(*args, "--out", tmp_path / "o", "-q"), "method iso_c failed on tensor model.layers.",
            "LinAlgError: linalg.svd: The algorithm failed to converge")
    assert not (tmp_path / "o").exists()


# --- warnings and notices ------------------------------------------------------------------------

def test_the_same_model_twice_is_one_warning(project, tmp_path, run_main):
    code, _, err = run_main(*ties(project, tmp_path / "a", "-q")[:5], f"{project / 'e0'},{project / 'e0'}",
                            "--out", tmp_path / "a", "-q")
    assert code == 0 and err.count("warning") == 1 and "is the same model as expert" in err
    code, _, err = run_main("--method", "ties", "--base", project / "base", "--experts",
                            f"{project / 'base'},{project / 'e1'}", "--out", tmp_path / "b", "-q")
    assert code == 0 and err.count("warning") == 1 and "is the same model as base" in err


def test_a_tiny_memory_budget_is_raised_with_a_notice(project, tmp_path, run_main):
    code, _, err = run_main(*ties(project, tmp_path / "o", "--memory-budget", "10KB", "-q"))
    assert code == 0 and "--memory-budget 10 KiB is less than one chunk" in err and err.count("\n") == 1


def test_interrupt_says_resume_and_the_rerun_says_it_resumes(project, tmp_path, run_main, monkeypatch):
    import mbmerge.engine.output.write as w
    out, real, calls = tmp_path / "o", w.ShardWriter.write, [0]

    def interrupted(self, t, start, values):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        real(self, t, start, values)
    monkeypatch.setattr(w.ShardWriter, "write", interrupted)
    code, _, err = run_main(*ties(project, out, "-q"))
    assert code == 130 and "run the same command again to resume" in err
    monkeypatch.setattr(w.ShardWriter, "write", real)
    code, _, err = run_main(*ties(project, out))
    assert code == 0 and err.startswith(f"mbmerge: resuming the interrupted merge into {out}: 4 of 21 tensors")


def test_experts_stored_in_another_float_dtype_merge_in_float32(family, tmp_path, run_main):
    t = family["tensors"]
    fp32 = write_model(tmp_path / "fp32", t["code"], dtype=torch.float32)
    fp16 = write_model(tmp_path / "fp16", t["ifeval"], dtype=torch.float16)
    out = tmp_path / "o"
    assert run_main("--method", "task_arithmetic", "--base", family["paths"]["base"], "--experts",
                    f"{family['paths']['math']},{fp32},{fp16}", "--out", out, "-q")[0] == 0
    got = read_model(out)
    for name, b in t["base"].items():   # b + sum_i (x_i - b) in float32, of the stored values, cast once
        xs = [t["math"][name].bfloat16().float(), t["code"][name].float(), t["ifeval"][name].half().float()]
        want = (b + sum(x - b for x in xs)).bfloat16()
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want), name
