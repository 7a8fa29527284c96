"""engine/inputs/resolve.py offline: a fake Hugging Face hub cache built on disk (HF_HUB_CACHE layout:
models--OWNER--NAME/{refs/main, snapshots/<commit>/ -> ../../blobs/<hash>}), hub ids and
MergeBench short names resolved against it, merged end to end, and clean errors otherwise."""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

import mbmerge
from conftest import read_model
from mbmerge.bin.cli import main
from mbmerge.common.errors import BadModel, UnknownExpert
from mbmerge.engine.inputs.index import TensorIndex
from mbmerge.common.names import mergebench_repo
from mbmerge.engine.inputs.resolve import resolve


def hub_repo(cache: Path, repo_id: str, src: Path, refs=("main",)) -> Path:
    """Put the files of folder `src` in the cache as repo_id's snapshot; returns the snapshot folder."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def gemma(hub, family):
    """google/gemma-2-2b and its MergeBench experts (the tiny family's weights), in the cache."""
    p = family["paths"]
    return {"base": hub_repo(hub, "google/gemma-2-2b", p["base"]),
            "math": hub_repo(hub, "MergeBench/gemma-2-2b_math", p["math"]),
            "coding": hub_repo(hub, "MergeBench/gemma-2-2b_coding", p["code"]),
            "instruction": hub_repo(hub, "MergeBench/gemma-2-2b_instruction", p["ifeval"])}


def test_resolve_hub_id_to_snapshot(hub, family):
    snap = hub_repo(hub, "acme/tiny-base", family["paths"]["base"], refs=("main", "v1"))
    commit = hashlib.sha1(b"acme/tiny-base").hexdigest()
    assert snap == hub / "models--acme--tiny-base" / "snapshots" / commit
    for ref in ["acme/tiny-base", "acme/tiny-base@v1", f"acme/tiny-base@{commit}"]:
        s = resolve(ref, "base")
        assert (s.ref, s.path, s.revision, s.role) == (ref, snap, commit, "base")
    assert (snap / "model-00001-of-00002.safetensors").is_symlink()
    assert len(TensorIndex.from_folder(snap).tensors) == 21


def test_local_folder_wins(family):
    s = resolve(str(family["paths"]["math"]), "expert m")
    assert (s.path, s.revision) == (family["paths"]["math"], None)


def test_merge_from_hub_ids_matches_local_merge(hub, family, tmp_path):
    p = family["paths"]
    snaps = {n: hub_repo(hub, f"acme/tiny-{n}", p[n]) for n in ["base", "math", "code"]}
    hub_out = mbmerge.merge("ties", base="acme/tiny-base", experts=["acme/tiny-math", "acme/tiny-code"],
                            out=tmp_path / "from-hub", density=0.3, progress=False)
    local_out = mbmerge.merge("ties", base=str(p["base"]), experts=[str(p["math"]), str(p["code"])],
                              out=tmp_path / "local", density=0.3, progress=False)
    merged, expected = read_model(hub_out), read_model(local_out)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[n], expected[n]) for n in merged)
    record = json.loads((hub_out / "mbmerge.json").read_text())
    assert record["base"] == {"role": "base", "ref": "acme/tiny-base", "path": str(snaps["base"]),
                              "revision": snaps["base"].name}
    assert [e["path"] for e in record["experts"]] == [str(snaps["math"]), str(snaps["code"])]
    assert json.loads((hub_out / "config.json").read_text()) == json.loads((p["base"] / "config.json").read_text())
    assert not (hub_out / "config.json").is_symlink()


@pytest.mark.parametrize("short, domain", [("math", "math"), ("code", "coding"), ("coding", "coding"),
                                           ("ifeval", "instruction"), ("instruction", "instruction")])
def test_mergebench_short_names(gemma, short, domain):
    assert mergebench_repo("google/gemma-2-2b@main", short) == f"MergeBench/gemma-2-2b_{domain}"
    s = resolve(short, f"expert {short}", "google/gemma-2-2b")
    assert (s.ref, s.path, s.revision) == (short, gemma[domain], gemma[domain].name)


def test_mergebench_merge_by_short_names(gemma, family, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["mbmerge", "--method", "task_arithmetic", "--base", "google/gemma-2-2b",
                                      "--experts", "math,code,ifeval", "--out", str(out), "-q"])
    main()
    assert capsys.readouterr().err == ""
    record = json.loads((out / "mbmerge.json").read_text())
    assert [(e["ref"], e["path"]) for e in record["experts"]] == [
        ("math", str(gemma["math"])), ("code", str(gemma["coding"])), ("ifeval", str(gemma["instruction"]))]
    t, merged = family["tensors"], read_model(out)
    name = "model.layers.0.mlp.up_proj.weight"
    want = t["base"][name] + sum(t[e][name] - t["base"][name] for e in ["math", "code", "ifeval"])
    # one bf16 step (2^-7 relative): only the rounding of the float32 sum may differ
    torch.testing.assert_close(merged[name].float(), want.to(torch.bfloat16).float(), rtol=2 ** -7, atol=0)


def _cli_error(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["mbmerge", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    return err.strip()


def test_repo_absent_from_offline_cache(gemma, hub, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    err = _cli_error(monkeypatch, capsys, "-m", "ties", "-b", "google/gemma-2-2b", "-e", "math,acme/absent",
                     "-o", out)
    assert err == (f"mbmerge: error: expert acme/absent: not a local folder, and hub repo acme/absent is not "
                   f"in the offline cache {hub} (HF_HUB_OFFLINE is set)")
    err = _cli_error(monkeypatch, capsys, "-m", "ties", "-b", "google/gemma-2-2b", "-e", "math,safety", "-o", out)
    assert err.startswith("mbmerge: error: expert safety: not a local folder, and hub repo "
                          "MergeBench/gemma-2-2b_safety is not in the offline cache")
    assert not out.exists() and not list(tmp_path.glob(".out.mbmerge-*"))


def test_unknown_revision_in_cache(gemma):
    with pytest.raises(UnknownExpert, match="hub repo google/gemma-2-2b@v9 is not in the offline cache"):
        resolve("google/gemma-2-2b@v9", "base")


def test_snapshot_linking_outside_its_repo_refused(hub, family, tmp_path):
    snap = hub_repo(hub, "acme/evil", family["paths"]["base"])
    other = hub_repo(hub, "acme/other", family["paths"]["math"])
    shard = snap / "model-00001-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to((other / "model-00001-of-00002.safetensors").resolve())
    with pytest.raises(BadModel, match=f"base {snap}: shard path 'model-00001-of-00002.safetensors' "
                                       f"points outside the model folder"):
        TensorIndex.from_folder(resolve("acme/evil", "base").path, "base")


@pytest.mark.parametrize("ref", ["/no/such/model", "./models/none", "~/none", "a/b/c"])
def test_path_like_reference_missing(ref):
    with pytest.raises(BadModel) as e:
        resolve(ref, f"expert {ref}")
    assert str(e.value) == f"expert {ref}: no such folder"


def test_domain_needs_base_and_unknown_reference():
    with pytest.raises(UnknownExpert, match="^expert code is a MergeBench domain; pass --base"):
        resolve("code", "expert code")
    with pytest.raises(UnknownExpert, match="^expert what\\?! is not a folder, a hub id"):
        resolve("what?!", "expert what?!")
