"""The `mbmerge` command on bad input: one line `mbmerge: error: ...` naming the folder, file or
tensor, exit code 2, no traceback, no output folder (nor its hidden temporary) left behind, and
inputs untouched. Runs `main()` in-process (its error handling is what is under test), and the
real entry point in a subprocess for a few cases."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_model, write_model
from test_index import BAD_FOLDERS, BAD_HEADERS, bad_folder, write_bad

N_TENSORS = 21


@pytest.fixture
def mbmerge(run_main):
    """Run `mbmerge ARGS...` in-process; returns (exit code, stderr)."""
    def run(*args):
        code, _, err = run_main(*args)
        return code, err
    return run


def snapshot(*folders) -> dict:
    return {p: p.read_bytes() for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


def assert_refused(result, out: Path, *fragments):
    code, err = result
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mbmerge: error: ")
    for f in fragments:
        assert str(f) in lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.mbmerge-*"))


def merge_args(family, out, *experts, method="ties", base=True):
    p = family["paths"]
    experts = experts or (p["math"], p["code"])
    return (["--method", method] + (["--base", p["base"]] if base else []) +
            ["--experts", ",".join(map(str, experts)), "--out", out, "-q"])


def test_good_merge_succeeds(family, tmp_path, mbmerge):
    out = tmp_path / "out"
    code, err = mbmerge(*merge_args(family, out))
    assert (code, err) == (0, "")
    assert len(read_model(out)) == N_TENSORS
    assert not list(tmp_path.glob(".out.mbmerge-*"))


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_bad_header_in_expert(family, tmp_path, mbmerge, case):
    bad = write_bad(tmp_path / "bad" / "model.safetensors", case)
    before = snapshot(bad.parent, family["paths"]["base"], family["paths"]["math"])
    out = tmp_path / "out"
    result = mbmerge(*merge_args(family, out, family["paths"]["math"], bad.parent))
    assert_refused(result, out, f"mbmerge: error: expert {bad}: ", *BAD_HEADERS[case][2])
    assert snapshot(bad.parent, family["paths"]["base"], family["paths"]["math"]) == before


def test_header_length_over_limit(family, tmp_path, mbmerge):
    bad = tmp_path / "bad" / "model.safetensors"
    bad.parent.mkdir()
    with open(bad, "wb") as f:
        f.write((150_000_000).to_bytes(8, "little") + b"{")
        f.truncate(200_000_000)
    out = tmp_path / "out"
    result = mbmerge(*merge_args(family, out, bad.parent, family["paths"]["math"]))
    assert_refused(result, out, bad, "header length 150000000", "100000000-byte limit")


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_expert_folder(family, tmp_path, mbmerge, case):
    folder, _, fragments = bad_folder(family, tmp_path, case)
    out = tmp_path / "out"
    result = mbmerge(*merge_args(family, out, family["paths"]["math"], folder))
    assert_refused(result, out, f"mbmerge: error: expert {folder}", *fragments)


@pytest.mark.parametrize("case", ["pickle_only", "index_escapes", "missing_folder"])
def test_bad_base_folder(family, tmp_path, mbmerge, case):
    folder, _, fragments = bad_folder(family, tmp_path, case)
    out = tmp_path / "out"
    result = mbmerge("-m", "ties", "-b", folder, "-e", f"{family['paths']['math']},{family['paths']['code']}",
                     "-o", out, "-q")
    assert_refused(result, out, f"mbmerge: error: base {folder}", *fragments)


def test_pickle_is_never_loaded(family, tmp_path, mbmerge, monkeypatch):
    folder, _, _ = bad_folder(family, tmp_path, "pickle_only")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    monkeypatch.setattr("pickle.load", lambda *a, **k: loads.append(a))
    assert_refused(mbmerge(*merge_args(family, tmp_path / "out", folder)), tmp_path / "out", "pytorch_model.bin")
    assert loads == []


def _variant(family, tmp_path, name, change, dtype=torch.bfloat16):
    tensors = {n: v.clone() for n, v in family["tensors"]["code"].items()}
    change(tensors)
    return write_model(tmp_path / name, tensors, dtype=dtype)


@pytest.mark.parametrize("name, change, dtype, fragments", [
    ("lacks", lambda t: t.pop("lm_head.weight"), torch.bfloat16,
     ["lacks 1 tensor(s) (lm_head.weight) that base has"]),
    ("extra", lambda t: t.update({"model.extra.weight": torch.ones(3)}), torch.bfloat16,
     ["has 1 tensor(s) (model.extra.weight) that base lacks"]),
    ("shape", lambda t: t.update({"model.norm.weight": torch.ones(33)}), torch.bfloat16,
     ["differs from base in 1 tensor(s) (model.norm.weight BF16[33] vs BF16[32])", "not fine-tunes of the same"]),
    ("vocab", lambda t: t.update({n: torch.cat([t[n], t[n][:3]]) for n in ("model.embed_tokens.weight",
                                                                          "lm_head.weight")}), torch.bfloat16,
     ["differs from base in 2 tensor(s) (", "model.embed_tokens.weight BF16[67, 32] vs BF16[64, 32]",
      "lm_head.weight BF16[67, 32] vs BF16[64, 32]", "the vocabularies differ", "pass --tokenizer-source"]),
])
def test_experts_disagree_with_base(family, tmp_path, mbmerge, name, change, dtype, fragments):
    folder = _variant(family, tmp_path, name, change, dtype)
    out = tmp_path / "out"
    assert_refused(mbmerge(*merge_args(family, out, family["paths"]["math"], folder)), out, folder, *fragments)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_nonfinite_input(family, tmp_path, mbmerge, value):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    folder = _variant(family, tmp_path, "poisoned", poison)
    before = snapshot(folder)
    out = tmp_path / "out"
    assert_refused(mbmerge(*merge_args(family, out, family["paths"]["math"], folder)), out,
                   folder, "tensor model.layers.1.mlp.up_proj.weight holds NaN or Inf", "--allow-nonfinite")
    code, err = mbmerge(*merge_args(family, out, family["paths"]["math"], folder), "--allow-nonfinite")
    assert (code, err) == (0, "")
    merged = read_model(out)
    assert len(merged) == N_TENSORS and torch.isfinite(merged["model.norm.weight"]).all()
    assert snapshot(folder) == before


PARAM_CASES = {
    "unknown_method": (["--method", "frobnicate"], ["unknown method 'frobnicate'", "linear", "ties"]),
    "density_with_linear": (["--method", "linear", "--density", "0.5"],
                            ["method linear has no parameter 'density'"]),
    "density_zero": (["--method", "ties", "--density", "0"], ["density=0.0 must be in (0, 1]"]),
    "density_above_one": (["--method", "ties", "--density", "1.5"], ["density=1.5 must be in (0, 1]"]),
    "density_not_a_number": (["--method", "ties", "--density", "lots"], ["density='lots' is not a float"]),
    "weights_count": (["--method", "ties", "--weights", "0.2,0.3,0.5"], ["weights has 3 values for 2 experts"]),
    "bad_choice": (["--method", "ties", "--consensus", "vote"], ["'--consensus'", "'vote'"]),
    "unknown_option": (["--method", "ties", "--bogus", "1"], ["No such option '--bogus'"]),
    "bad_memory_budget": (["--method", "ties", "--memory-budget", "lots"], ["memory budget 'lots'"]),
    "bad_keep_base": (["--method", "ties", "--keep-base", "(lm_head"], ["--keep-base '(lm_head'"]),
}


@pytest.mark.parametrize("case", PARAM_CASES)
def test_bad_parameters(family, tmp_path, mbmerge, case):
    args, fragments = PARAM_CASES[case]
    p, out = family["paths"], tmp_path / "out"
    result = mbmerge(*args, "-b", p["base"], "-e", f"{p['math']},{p['code']}", "-o", out, "-q")
    assert_refused(result, out, *fragments)


def test_missing_required_option(tmp_path, mbmerge):
    out = tmp_path / "out"
    assert_refused(mbmerge("--method", "ties", "--out", out), out, "Missing option '--experts'")


def test_existing_output_refused_then_overwritten(family, tmp_path, mbmerge):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, err = mbmerge(*merge_args(family, out))
    assert code == 2 and err.splitlines() == [
        f"mbmerge: error: output {out} already exists and is not empty "
        f"(pass --overwrite to replace an earlier mbmerge output, or choose another --out)"]
    code, err = mbmerge(*merge_args(family, out), "--overwrite")      # not a folder mbmerge wrote: kept
    assert code == 2 and "holds files mbmerge did not write" in err
    assert [f.name for f in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert mbmerge(*merge_args(family, out)) == (0, "")
    first = read_model(out)
    assert (mbmerge(*merge_args(family, out, method="task_arithmetic"), "--overwrite")) == (0, "")
    assert len(read_model(out)) == N_TENSORS and read_model(out).keys() == first.keys()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


def test_existing_output_file_refused(family, tmp_path, mbmerge):
    out = tmp_path / "out"
    out.write_text("x")
    code, err = mbmerge(*merge_args(family, out))
    assert code == 2 and err.startswith(f"mbmerge: error: output {out} is a file") and out.read_text() == "x"


def test_empty_output_folder_is_used(family, tmp_path, mbmerge):
    out = tmp_path / "out"
    out.mkdir()
    assert mbmerge(*merge_args(family, out)) == (0, "")
    assert len(read_model(out)) == N_TENSORS


def test_domain_without_base_needs_base(family, tmp_path, mbmerge):
    out = tmp_path / "out"
    assert_refused(mbmerge(*merge_args(family, out, family["paths"]["code"], "math", base=False)), out,
                   "method ties needs a base model (--base)")
    assert_refused(mbmerge(*merge_args(family, out, family["paths"]["code"], "math", method="linear", base=False)),
                   out, "expert math is a MergeBench domain; pass --base")


@pytest.mark.parametrize("ref, fragments", [
    ("nonsense", ["expert nonsense is not a folder, a hub id (owner/name) or a MergeBench domain"]),
    ("./no/such/dir", ["expert ./no/such/dir: no such folder"]),
    ("acme/not-cached", ["expert acme/not-cached: not a local folder, and hub repo acme/not-cached "
                         "is not in the offline cache"]),
])
def test_unknown_expert_reference(family, tmp_path, mbmerge, ref, fragments):
    out = tmp_path / "out"
    assert_refused(mbmerge(*merge_args(family, out, family["paths"]["code"], ref)), out, *fragments)


def test_disk_full_is_one_line_and_cleaned_up(family, tmp_path, mbmerge, monkeypatch):
    def full(folder, plan, fresh=True):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model-00001-of-00002.safetensors"))
    monkeypatch.setattr("mbmerge.engine.api.ShardWriter", full)
    out = tmp_path / "out"
    tmp = tmp_path / ".out.mbmerge-partial"
    assert_refused(mbmerge(*merge_args(family, out)), out,
                   f"mbmerge: error: No space left on device: {tmp / 'model-00001-of-00002.safetensors'}")


def test_disk_full_mid_merge_is_one_line_and_cleaned_up(family, tmp_path, mbmerge, monkeypatch):
    """The disk fills while the output's disk thread writes: the merge stops with one line, nothing left."""
    import mbmerge.engine.output.direct as direct
    real, calls = os.pwrite, [0]

    def filling(fd, data, pos):
        calls[0] += 1
        if calls[0] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)
    monkeypatch.setattr(direct, "STAGE", 4096)        # many writes from a small model
    monkeypatch.setattr(os, "pwrite", filling)
    out = tmp_path / "out"
    before = snapshot(family["paths"]["math"], family["paths"]["code"])
    code, err = mbmerge(*merge_args(family, out))
    assert calls[0] > 3
    tmp = tmp_path / ".out.mbmerge-partial"
    assert_refused((code, err), out, f"mbmerge: error: No space left on device: {tmp}{os.sep}", ".safetensors")
    assert snapshot(family["paths"]["math"], family["paths"]["code"]) == before


def test_other_os_errors_keep_their_traceback(family, tmp_path, mbmerge, monkeypatch):
    def bug(folder, plan, fresh=True):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/oops")
    monkeypatch.setattr("mbmerge.engine.api.ShardWriter", bug)
    with pytest.raises(FileNotFoundError):
        mbmerge(*merge_args(family, tmp_path / "out"))
    assert not list(tmp_path.glob(".out.mbmerge-*"))


@pytest.mark.parametrize("make, fragment", [
    (lambda family, tmp: tmp / "missing", "no such folder"),
    (lambda family, tmp: write_bad(tmp / "bad" / "model.safetensors", "overlapping").parent,
     "tensor 'b' at buffer offset 4 overlaps"),
])
def test_entry_point_in_subprocess(family, tmp_path, make, fragment):
    folder, out = make(family, tmp_path), tmp_path / "out"
    cmd = [sys.executable, "-c", "import sys; from mbmerge.bin.cli import main; sys.argv[0] = 'mbmerge'; main()",
           *map(str, merge_args(family, out, family["paths"]["math"], folder))]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("mbmerge: error: ")
    assert str(folder) in r.stderr and fragment in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.mbmerge-*"))


def test_a_merge_freezes_its_imports_and_leaves_the_collector_on(family, tmp_path):
    """The merge's imports (torch's objects) out of every later garbage collection, the collector running."""
    report = "atexit.register(lambda: print('gc', gc.isenabled(), gc.get_freeze_count(), file=sys.stderr))"
    cmd = [sys.executable, "-c", f"import atexit, gc, sys; from mbmerge.bin.cli import main; {report}; "
           "sys.argv[0] = 'mbmerge'; main()", *map(str, merge_args(family, tmp_path / "out"))]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert r.returncode == 0, r.stderr
    _, enabled, frozen = r.stderr.splitlines()[-1].split()
    assert enabled == "True" and int(frozen) > 50_000
    assert (tmp_path / "out" / "mbmerge.json").exists()


def test_config_recipe_runs_like_the_equivalent_flags(family, tmp_path, mbmerge):
    p = family["paths"]
    recipe = tmp_path / "ties.yml"
    recipe.write_text(f"merge_method: ties\nbase_model: {p['base']}\nmodels:\n"
                      f"  - model: {p['math']}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
                      f"  - model: {p['code']}\n    parameters: {{weight: 0.3, density: 0.5}}\n"
                      "parameters: {normalize: true}\ndtype: bfloat16\n")
    assert mbmerge("--config", recipe, "--out", tmp_path / "a", "-q") == (0, "")
    assert mbmerge(*merge_args(family, tmp_path / "b"), "--weights", "0.7,0.3", "--density", "0.5",
                   "--aggregate", "mean") == (0, "")
    a, b = read_model(tmp_path / "a"), read_model(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    out = tmp_path / "c"
    assert_refused(mbmerge("--config", recipe, "--method", "ties", "--density", "0.2", "--out", out), out,
                   f"--config {recipe} sets the recipe; do not also pass --method, --density")
    recipe.write_text("merge_method: ties\nslices: []\n")
    assert_refused(mbmerge("--config", recipe, "--out", out), out, str(recipe), "'slices'")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_threads_holds_the_merge_to_n_cores_and_writes_the_same_bytes(family, tmp_path, run_main):
    """--threads 1: the card says one thread, the bytes are those of a merge on every core, and the process's
    cores are given back afterwards."""
    import json
    p, before = family["paths"], os.sched_getaffinity(0)
    args = ["--method", "ties", "--base", p["base"], "--experts", f"{p['math']},{p['code']}", "-q"]
    assert run_main(*args, "--out", tmp_path / "one", "--threads", "1")[0] == 0
    assert run_main(*args, "--out", tmp_path / "all")[0] == 0
    assert os.sched_getaffinity(0) == before
    assert json.loads((tmp_path / "one" / "mbmerge.json").read_text())["kernels"]["threads"] == 1
    assert "1 thread)" in (tmp_path / "one" / "README.md").read_text()
    one, every = read_model(tmp_path / "one"), read_model(tmp_path / "all")
    assert all(torch.equal(one[n], every[n]) for n in every)
    code, _, err = run_main(*args, "--out", tmp_path / "none", "--threads", "0")
    assert code == 2 and "--threads" in err and not (tmp_path / "none").exists()
