"""Nothing in a model folder runs, and nothing leaves it or the output folder: no pickle is ever
unpickled (a real malicious pickle beside or instead of the safetensors), no trust_remote_code,
hub downloads fetch only safetensors, index and tokenizer/config files, symlinks out of a model
folder are refused (except a hub snapshot's links into its own repo's blobs/), and output shard
names cannot escape --out or clash with the files mbmerge writes itself.

Already covered elsewhere, not repeated: index paths '../x' and absolute (test_index.py
BAD_FOLDERS), a shard symlinked to an absolute path outside (test_index.py), a snapshot linking
into another repo (test_resolve.py), a pickle-only folder through the command line (test_cli.py)."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import mbmerge
from conftest import read_model
from mbmerge.common.errors import BadModel
from mbmerge.engine.inputs.index import INDEX_FILE, TensorIndex
from mbmerge.engine.inputs.resolve import resolve
from test_resolve import hub_repo

PACKAGE = Path(mbmerge.__file__).parent
SHARD1 = "model-00001-of-00002.safetensors"


def tree(root: Path) -> dict:
    """Every path under root (files with their bytes, links with their targets)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[p] = ("link", os.readlink(p))
        elif p.is_file():
            out[p] = p.read_bytes()
        else:
            out[p] = "dir"
    return out


def copy_model(family, dest: Path, name: str = "base") -> Path:
    shutil.copytree(family["paths"][name], dest, symlinks=True)
    return dest


def refused(folder: Path, *fragments, label="base"):
    with pytest.raises(BadModel) as e:
        TensorIndex.from_folder(folder, label)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{label} {folder}: "), msg
    for f in fragments:
        assert f in msg, msg
    return msg


def merge(family, out: Path, base: Path, **kw):
    p = family["paths"]
    return mbmerge.merge("ties", base=str(base), experts=[str(p["math"]), str(p["code"])], out=str(out),
                         density=0.5, progress=False, **kw)


def assert_merge_refused(family, root: Path, base: Path, *fragments):
    """The merge raises a one-line BadModel and nothing under root changes (no --out, no lock,
    no partial folder, nothing beside)."""
    before = tree(root)
    out = root / "out"
    with pytest.raises(BadModel) as e:
        merge(family, out, base)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"base {base}: "), msg
    for f in fragments:
        assert f in msg, msg
    assert tree(root) == before
    return msg


# --- no code from a model folder ------------------------------------------------------------

class Payload:
    """Unpickling this runs `touch MARKER`: the proof that a pickle was loaded."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_pickle(path: Path, marker: Path) -> None:
    torch.save({"model.embed_tokens.weight": Payload(marker)}, path)   # a zip with data.pkl, like HF's
    assert not marker.exists()


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every way to unpickle, or to torch.load, raises."""
    def forbidden(*a, **k):
        raise AssertionError("a pickle was loaded")
    for target in ["torch.load", "torch.serialization.load", "pickle.load", "pickle.loads", "pickle.Unpickler",
                   "_pickle.load", "_pickle.loads", "_pickle.Unpickler"]:
        monkeypatch.setattr(target, forbidden)


def test_pickle_only_folder_refused_and_never_unpickled(family, tmp_path, no_unpickling):
    base = tmp_path / "models" / "pickled"
    base.mkdir(parents=True)
    marker = tmp_path / "pwned"
    malicious_pickle(base / "pytorch_model.bin", marker)
    shutil.copy(family["paths"]["base"] / "config.json", base)
    assert_merge_refused(family, tmp_path, base, "holds only pickle checkpoints (pytorch_model.bin)")
    assert not marker.exists()


def test_pickle_beside_safetensors_ignored(family, tmp_path, no_unpickling):
    """A merge of the family with every unpickler booby-trapped, and a malicious
    pytorch_model.bin and optimizer.pt in the base: merged from the safetensors, nothing run,
    the pickles not copied to the output."""
    base = copy_model(family, tmp_path / "base")
    marker = tmp_path / "pwned"
    malicious_pickle(base / "pytorch_model.bin", marker)
    malicious_pickle(base / "optimizer.pt", marker)
    out = merge(family, tmp_path / "out", base)
    plain = merge(family, tmp_path / "plain", family["paths"]["base"])
    assert not marker.exists()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    merged, expected = read_model(out), read_model(plain)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[n], expected[n]) for n in merged)


def package_sources() -> list[Path]:
    """The package's own modules (an editable tree also holds tests, a build/ copy and a .venv)."""
    return [p for p in PACKAGE.rglob("*.py")
            if not any(x in ("tests", "build") or x.startswith(".") for x in p.relative_to(PACKAGE).parts)]


def test_no_trust_remote_code_nor_unpickling_in_the_package():
    """No source file of the package passes trust_remote_code (other than =False) or calls an
    unpickler: the merged model's and the inputs' code never runs."""
    sources = package_sources()
    assert len(sources) > 20 and PACKAGE / "engine" / "inputs" / "index.py" in sources
    for path in sources:
        text = path.read_text()
        for m in re.finditer(r"trust_remote_code\W*(\w+)", text):
            assert m.group(1) == "False", f"{path}: {m.group(0)}"
        for pattern in [r"\btorch\.load\(", r"\bpickle\.loads?\(", r"\bUnpickler\(", r"\bjoblib\.load\(",
                        r"\bnp\.load\(", r"\bnumpy\.load\(", r"\bdill\."]:
            assert not re.search(pattern, text), f"{path}: {pattern}"


# --- hub downloads: only the files a merge needs ----------------------------------------------

NEEDED = ["model.safetensors", "model-00001-of-00002.safetensors", INDEX_FILE, "config.json",
          "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
NEVER = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "training_args.bin", "optimizer.pt",
         "scheduler.pt", "rng_state.pth", "model.ckpt", "model.pkl", "model.pickle", "model.joblib", "tf_model.h5",
         "flax_model.msgpack", "model.gguf", "model.onnx", "arrays.npy", "arrays.npz", "modeling_evil.py",
         "configuration_evil.py", "tokenization_evil.py", "custom_generate/generate.py", "setup.sh",
         "src/evil.py", "__init__.py", "requirements.txt", "Dockerfile"]


@pytest.mark.parametrize("ref, base_ref, repo_id, revision", [
    ("acme/tiny", None, "acme/tiny", None),
    ("acme/tiny@v1.0", None, "acme/tiny", "v1.0"),
    ("math", "google/gemma-2-2b", "MergeBench/gemma-2-2b_math", None),
])
def test_hub_download_patterns(monkeypatch, tmp_path, ref, base_ref, repo_id, revision):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    calls = []
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()

    def fake_snapshot_download(*args, **kwargs):
        calls.append((args, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    source = resolve(ref, f"expert {ref}", base_ref)
    assert source.path == snapshot and len(calls) == 1
    (args, kwargs) = calls[0]
    assert (args[0] if args else kwargs["repo_id"]) == repo_id and kwargs.get("revision") == revision
    assert "trust_remote_code" not in kwargs
    patterns = kwargs["allow_patterns"]
    assert patterns and not isinstance(patterns, str)
    kept = set(filter_repo_objects(NEEDED + NEVER, allow_patterns=patterns,
                                   ignore_patterns=kwargs.get("ignore_patterns")))
    assert kept == set(NEEDED), f"downloads {sorted(kept - set(NEEDED))}, lacks {sorted(set(NEEDED) - kept)}"


# --- symlinks out of a model folder -----------------------------------------------------------

def test_shard_symlink_relative_outside_refused(family, tmp_path):
    base = copy_model(family, tmp_path / "models" / "base")
    shutil.move(base / SHARD1, tmp_path / "models" / SHARD1)
    (base / SHARD1).symlink_to(Path("..", SHARD1))
    assert_merge_refused(family, tmp_path, base, f"'{SHARD1}' points outside the model folder")


def test_shard_symlink_chain_leading_outside_refused(family, tmp_path):
    """inside link -> inside link -> outside: where the chain ends is what counts."""
    base = copy_model(family, tmp_path / "models" / "base")
    shutil.move(base / SHARD1, tmp_path / "elsewhere.safetensors")
    (base / "hop.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    (base / SHARD1).symlink_to("hop.safetensors")
    refused(base, "points outside the model folder")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "notes.txt"])
def test_side_file_symlink_outside_refused(family, tmp_path, name):
    """A config or tokenizer file (or any other file the output would copy) linked to a file of
    the user's is refused: the output, which may be published, never gets its contents."""
    base = copy_model(family, tmp_path / "models" / "base")
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (base / name).unlink(missing_ok=True)
    (base / name).symlink_to(secret)
    assert_merge_refused(family, tmp_path, base, f"symlink '{name}' points outside the model folder")


def test_symlinks_inside_folder_and_symlinked_folder_accepted(family, tmp_path):
    """Links that stay inside the folder, and a model folder that is itself a link, are fine."""
    real = copy_model(family, tmp_path / "store" / "base")
    (real / SHARD1).rename(real / "blob-1")
    (real / SHARD1).symlink_to("blob-1")
    (real / "config.json").rename(real / "config.real")
    (real / "config.json").symlink_to(real / "config.real")   # absolute, but inside
    link = tmp_path / "base-link"
    link.symlink_to(real)
    out = merge(family, tmp_path / "out", link)
    expected = merge(family, tmp_path / "plain", family["paths"]["base"])
    merged, want = read_model(out), read_model(expected)
    assert all(torch.equal(merged[n], want[n]) for n in want)
    assert not (out / "config.json").is_symlink()


def test_hub_snapshot_links_into_its_blobs_accepted_and_out_of_its_repo_refused(family, tmp_path):
    cache = tmp_path / "hub"
    snap = hub_repo(cache, "acme/tiny", family["paths"]["base"])
    assert (snap / SHARD1).is_symlink() and (snap / "config.json").is_symlink()
    assert len(TensorIndex.from_folder(snap).tensors) == 21          # ../../blobs/<hash>: its own repo
    secret = cache / "token"                                          # the cache root: outside models--acme--tiny
    secret.write_text("hf_xxx")
    (snap / "tokenizer.json").unlink()
    (snap / "tokenizer.json").symlink_to(Path("..", "..", "..", "token"))
    refused(snap, "symlink 'tokenizer.json' points outside the model folder")


def test_folder_named_snapshots_outside_a_hub_cache_gets_no_leeway(family, tmp_path):
    """Only models--*/snapshots/<rev> may link into its repo's blobs/; a look-alike may not."""
    fake = tmp_path / "notacache" / "snapshots" / "rev"
    copy_model(family, fake)
    (fake.parent.parent / "blobs").mkdir()
    shutil.move(fake / SHARD1, fake.parent.parent / "blobs" / "abc")
    (fake / SHARD1).symlink_to(Path("..", "..", "blobs", "abc"))
    refused(fake, f"'{SHARD1}' points outside the model folder")


# --- output shard names ------------------------------------------------------------------------

def rename_shard(folder: Path, new: str) -> None:
    """Move SHARD1 to `new` (relative to the folder) and point the index there."""
    (folder / "sub").mkdir()
    target = folder / new
    (folder / SHARD1).rename(target)
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"] = {k: (new if v == SHARD1 else v) for k, v in index["weight_map"].items()}
    (folder / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize("shard, fragment", [
    ("../evil.safetensors", "shard path '../evil.safetensors' points outside the model folder"),
    ("../../evil.safetensors", "shard path '../../evil.safetensors' points outside the model folder"),
    ("sub/x.safetensors", "shard path 'sub/x.safetensors' is in a subfolder"),
    ("sub/../../base/x.safetensors", "shard path 'sub/../../base/x.safetensors' is in a subfolder"),
    ("README.md", "shard 'README.md' is not named *.safetensors"),
    ("mbmerge.json", "shard 'mbmerge.json' is not named *.safetensors"),
    ("config.json", "shard 'config.json' is not named *.safetensors"),
    ("mbmerge-journal.jsonl", "shard 'mbmerge-journal.jsonl' is not named *.safetensors"),
])
def test_output_shard_names_cannot_escape_out(family, tmp_path, shard, fragment):
    """The output reuses the base's shard names; a base whose index names a shard outside its
    folder, in a subfolder, or after a file mbmerge writes itself (model card, record, journal,
    copied config) is refused before anything is written, beside --out or anywhere."""
    base = copy_model(family, tmp_path / "models" / "base")
    rename_shard(base, shard)
    assert_merge_refused(family, tmp_path, base, fragment)
