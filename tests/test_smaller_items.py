"""Issue 26's smaller items, from the user's side: `mbmerge methods` keeps its columns, `dir(mbmerge)`
shows the lazy exports, extract-lora leaves unchanged tensors out (and peft still loads the folder),
`verify --inputs` forgives a touch and says what it cannot see, and the kernel help, --version and
kernels.merge_backend say what runs."""
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import base_tensors, read_model, write_model

MBMERGE = Path(sys.executable).parent / "mbmerge"
PACKAGE = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under folder: what a read-only command must keep."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. mbmerge methods: columns from the longest entry ------------------------------------------

def test_methods_table_columns_line_up_for_long_names(run_main):
    from mbmerge.methods import REGISTRY
    code, out, err = run_main("methods")
    assert code == 0, err
    rows = [line for line in out.splitlines() if not line.startswith("    ")]
    params = [line for line in out.splitlines() if line.startswith("    ")]
    names = [*REGISTRY, "--calibrate svc", "--weights-from nan"]    # the methods, then what any method takes
    width = max(len(name) for name in names)                # localize_stitch_trained: 23
    assert [row[:width].rstrip() for row in rows] == names
    assert all(row[width:width + 2] == "  " and row[width + 2] != " " for row in rows)
    starts = {line.index(" default ") for line in params}   # the default column, after the longest flag
    assert len(starts) == 1
    helps = {re.match(r"    \S+ +default \S+ +", line).end() for line in params}
    assert len(helps) == 1                                  # the help column, after the longest default


# --- 2. dir(mbmerge) ----------------------------------------------------------------------------

def test_dir_lists_the_lazy_exports_without_importing_torch(tmp_path):
    code = ("import sys, mbmerge; names = dir(mbmerge); print(sorted(names)); "
            "print('torch' in sys.modules); print(all(getattr(mbmerge, n) is not None for n in names))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    listed, torch_loaded, resolve = done.stdout.splitlines()
    expected = {"merge", "collect_statistics", "MergeSpec", "MbmergeError", "__version__",
                "bin", "common", "engine", "eval", "kernels", "methods", "stats", "tune"}
    assert expected <= set(eval(listed)), listed
    assert torch_loaded == "False" and resolve == "True"


# --- 3. extract-lora leaves unchanged tensors out -----------------------------------------------

RANK = 3
LOW_RANK = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.mlp.up_proj.weight"]
DENSE = ["model.norm.weight", "model.layers.1.input_layernorm.weight"]


@pytest.fixture(scope="module")
def partly_tuned(tmp_path_factory):
    """float32 base and a fine-tune that moved only LOW_RANK (rank-3 deltas) and DENSE (noise); every
    other tensor (embeddings and head included) is the base's, bit for bit."""
    root = tmp_path_factory.mktemp("unchanged")
    base = base_tensors()
    tuned = dict(base)
    for k, n in enumerate(LOW_RANK):
        g = torch.Generator().manual_seed(k)
        rows, cols = base[n].shape
        tuned[n] = base[n] + 0.02 * torch.randn(rows, RANK, generator=g) @ torch.randn(RANK, cols, generator=g)
    for k, n in enumerate(DENSE):
        tuned[n] = base[n] + 0.01 * torch.randn(base[n].shape, generator=torch.Generator().manual_seed(50 + k))
    return {"base": write_model(root / "base", base, dtype=torch.float32),
            "tuned": write_model(root / "tuned", tuned, dtype=torch.float32), "tensors": (base, tuned)}


def test_extract_lora_leaves_unchanged_tensors_out_and_peft_loads_the_rest(partly_tuned, tmp_path, run_main):
    peft = pytest.importorskip("peft")
    import transformers
    base, tuned = partly_tuned["tensors"]
    unchanged = sorted(n for n in base if torch.equal(base[n], tuned[n]))
    assert len(unchanged) == len(base) - len(LOW_RANK) - len(DENSE)
    out, before = tmp_path / "adapter", snapshot(partly_tuned["base"].parent)
    code, stdout, err = run_main("extract-lora", "--base", partly_tuned["base"], "--model", partly_tuned["tuned"],
                                 "--out", out, "--rank", "8", "--sv-epsilon", "1e-5")
    assert code == 0, err
    assert f"{len(unchanged)} tensor(s) equal to the base's left out (no LoRA, no copy)" in stdout
    assert snapshot(partly_tuned["base"].parent) == before           # the inputs are only read
    p = "base_model.model."
    want = {p + n.removesuffix(".weight") + part for n in LOW_RANK for part in (".lora_A.weight", ".lora_B.weight")}
    assert set(read_model(out)) == want | {p + n for n in DENSE}      # no zero LoRA, no embedding or head copy
    assert json.loads((out / "mbmerge.json").read_text())["unchanged"] == unchanged
    config = json.loads((out / "adapter_config.json").read_text())
    # q_proj moved in every layer: its short name; up_proj in layer 1 only, and 'norm' also ends the
    # unchanged layernorms: full names, so PEFT wraps nothing it has no weights for
    assert config["target_modules"] == ["model.layers.1.mlp.up_proj", "q_proj"]
    assert config["modules_to_save"] == ["model.layers.1.input_layernorm", "model.norm"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(partly_tuned["base"]), dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(model, str(out)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    wrapped = sorted(n.removeprefix("base_model.model.").rsplit(".", 1)[0] for n, _ in adapted.named_modules()
                     if n.endswith((".lora_A", ".modules_to_save")))
    assert wrapped == sorted(n.removesuffix(".weight") for n in LOW_RANK + DENSE)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(partly_tuned["tuned"]), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 3, 17, 2]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, reference.eval()(ids).logits, atol=1e-5)


def test_extract_lora_refuses_when_no_lora_module_changed(partly_tuned, tmp_path, run_main):
    """PEFT cannot load a LoRA adapter that targets no module: one line, nothing written."""
    base, _ = partly_tuned["tensors"]
    only_norm = write_model(tmp_path / "norm", {**base, "model.norm.weight": base["model.norm.weight"] + 1},
                            dtype=torch.float32)
    for model, says in [(only_norm, "no LoRA to extract: every 2-D weight was excluded or equals the base's"),
                        (partly_tuned["base"], "nothing to extract: every tensor was excluded or equals the base's")]:
        code, stdout, err = run_main("extract-lora", "--base", partly_tuned["base"], "--model", model,
                                     "--out", tmp_path / "x")
        error = err.strip().splitlines()[-1]               # after the progress bar
        assert code != 0 and error.startswith("mbmerge: error: " + says) and err.count("mbmerge:") == 1, err
        assert "Traceback" not in err
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob("*partial*"))


# --- 4. verify --inputs after a touch -----------------------------------------------------------

@pytest.fixture
def merged(family, tmp_path, run_main):
    """A merge (through the command line) of private copies of the family, whose inputs a test may change."""
    paths = {k: Path(shutil.copytree(family["paths"][k], tmp_path / k)) for k in ("base", "math", "code")}
    code, _, err = run_main("--method", "task_arithmetic", "--base", paths["base"], "--experts",
                            f"{paths['math']},{paths['code']}", "--out", tmp_path / "out")
    assert code == 0, err
    return tmp_path / "out", sorted(paths["math"].glob("*.safetensors"))[0]


def data_start(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def set_byte(path: Path, offset: int, value: bytes, keep_time: bool) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)
    if keep_time:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_inputs_forgives_a_touch_and_says_what_it_compared(merged, run_main):
    out, shard = merged
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))     # touch
    before = snapshot(out)
    code, stdout, err = run_main("verify", out, "--inputs")
    assert (code, err) == (0, "")
    note = (f"note: input {shard.resolve()}: only its time changed (mtime_ns {st.st_mtime_ns} -> "
            f"{st.st_mtime_ns + 10**9}): size and safetensors header as recorded; its tensor data were not "
            f"compared (the merge recorded no digest of them)")
    assert stdout.splitlines()[0] == note and stdout.splitlines()[1].startswith(f"{out}: OK")
    assert snapshot(out) == before                                        # verify writes nothing


def test_verify_inputs_what_a_changed_byte_shows(merged, run_main):
    """A data byte changed with the time set back is invisible (no digest of the data is recorded); a
    header byte is seen whatever the time; a recorded content sha256 sees a data byte."""
    out, shard = merged
    set_byte(shard, data_start(shard) + 5, b"\x55", keep_time=True)
    code, stdout, err = run_main("verify", out, "--inputs")
    assert (code, err) == (0, "") and stdout.startswith(f"{out}: OK") and "note" not in stdout   # unseen
    set_byte(shard, shard.read_bytes().index(b'"pt"') + 2, b"T", keep_time=True)
    code, _, err = run_main("verify", out, "--inputs")
    assert code == 1 and err == (f"mbmerge: verify: input {shard.resolve()}: changed since the merge (its "
                                 f"safetensors header's sha256 differs from the recorded one)\n")
    set_byte(shard, shard.read_bytes().index(b'"pT"') + 2, b"t", keep_time=True)    # the header back
    record = json.loads((out / "mbmerge.json").read_text())
    record["inputs"][str(shard.resolve())]["sha256"] = "0" * 64       # as if the merge had recorded a digest
    (out / "mbmerge.json").write_text(json.dumps(record))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    code, _, err = run_main("verify", out, "--inputs")
    assert code == 1 and "its contents' sha256 differs from the recorded one" in err and str(shard.resolve()) in err


# --- 5. what --kernels, --compile and --version say, and merge_backend ----------------------------

def test_kernel_help_says_what_each_choice_runs(run_main):
    code, out, _ = run_main("merge", "--help")
    text = " ".join(out.split()).replace("--no- compile", "--no-compile")    # click may wrap at a hyphen
    assert code == 0
    assert ("auto: Triton on a CUDA device (when installed, else torch); on the CPU the compiled C loops when they "
            "are built (`mbmerge --version` says) and --compile is on, else the torch methods.") in text
    assert "torch: the eager torch methods everywhere (on the CPU, the same as --no-compile)." in text
    assert ("--compile / --no-compile With --kernels auto on the CPU: the compiled C loops (the fast path), or the "
            "torch methods (slower, the same bytes); no effect on a GPU") in text


def test_version_says_whether_the_compiled_loops_and_triton_are_there(tmp_path):
    done = subprocess.run([str(MBMERGE), "--version"], capture_output=True, text=True, cwd=tmp_path)
    import mbmerge                       # the installed package (a wheel in CI), where the loops were built
    built = list((Path(mbmerge.__file__).parent / "kernels").glob("_cpu_merge*.so"))
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    loops = "available" if built and " avx2" in flags and " f16c" in flags else "unavailable: "
    try:
        triton = importlib.metadata.version("triton") + " (CUDA devices)"
    except importlib.metadata.PackageNotFoundError:
        triton = "absent"
    version = re.search(r'^VERSION = "(.+)"$', (PACKAGE / "common" / "__init__.py").read_text(), re.M).group(1)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith(f"mbmerge {version} (compiled CPU loops: {loops}")
    assert done.stdout.endswith(f"; triton: {triton})\n")


def test_version_gives_the_reason_the_loops_cannot_run(run_main, monkeypatch):
    from mbmerge.kernels import cpu
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: {"sse2"})           # a CPU without AVX2
    code, out, err = run_main("--version")
    assert (code, err) == (0, "")
    assert "(compiled CPU loops: unavailable: this CPU lacks AVX2 or F16C for the compiled CPU kernels; triton:" in out


def test_merge_backend_names_what_runs_and_its_threads():
    from mbmerge import kernels
    cores = len(os.sched_getaffinity(0))
    loops = kernels.cpu.library() is not None
    with kernels.using("auto", compile=True):
        assert kernels.merge_backend("cpu") == (("compiled C loops" if loops else "torch"), cores)
        assert kernels.merge_backend("cpu", fused=False, span="row") == ("torch", torch.get_num_threads())
        assert kernels.merge_backend("cuda") == ("triton" if kernels.has_triton() else "torch", None)
    for backend, compile in [("auto", False), ("torch", True)]:   # --no-compile and --kernels torch: one path
        with kernels.using(backend, compile=compile):
            assert kernels.merge_backend("cpu") == ("torch", cores)
            assert kernels.merge_backend("cpu", fused=False, span="whole") == ("torch", torch.get_num_threads())
            assert kernels.merge_backend("cuda", fused=False) == ("torch", None)


def test_no_compile_and_kernels_torch_write_the_same_bytes(family, tmp_path, run_main):
    p = family["paths"]
    digests = []
    for flags in [[], ["--no-compile"], ["--kernels", "torch"]]:
        out = tmp_path / f"out{len(digests)}"
        code, _, err = run_main("--method", "ties", "--base", p["base"], "--experts", f"{p['math']},{p['code']}",
                                "--out", out, *flags)
        assert code == 0, err
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.glob("*.safetensors")})
    assert digests[0] == digests[1] == digests[2] and digests[0]
