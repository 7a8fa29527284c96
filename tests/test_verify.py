"""`mbmerge verify`: a merged folder verifies; each kind of damage (flipped byte, NaN, truncated,
deleted or added shard, corrupt or missing mbmerge.json, changed input) is one line naming the
file or tensor. Damage is made and checked with hashlib, struct/json and the safetensors library,
never with mbmerge's own reader."""
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mbmerge
from mbmerge.engine.output import verify as verify_mod
from mbmerge.common.errors import BadModel
from mbmerge.engine.output.verify import sha256_files, verify

N_TENSORS = 21
INDEX = "model.safetensors.index.json"
BF16_NAN = b"\xc0\x7f"  # 0x7fc0 little-endian


@pytest.fixture
def cli(run_main):
    """`mbmerge ARGS...` in-process: (exit code, stdout, stderr)."""
    return run_main


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def header(path: Path) -> tuple[int, dict]:
    """(buffer start, header JSON) of a safetensors file, parsed by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8:8 + n])


def tensor_offset(folder: Path, name: str) -> tuple[Path, int, int]:
    """(shard, absolute first byte, nbytes) of tensor `name`."""
    for shard in shards(folder):
        start, h = header(shard)
        if name in h:
            begin, end = h[name]["data_offsets"]
            return shard, start + begin, end - begin
    raise KeyError(name)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def load_record(folder: Path) -> dict:
    return json.loads((folder / "mbmerge.json").read_text())


def save_record(folder: Path, record: dict) -> None:
    (folder / "mbmerge.json").write_text(json.dumps(record, indent=2))


def record_integrity(folder: Path) -> None:
    """Add "sha256" (and "inputs") to mbmerge.json when the merge did not record them, as the merge
    itself will: digests of every shard and the index; size/mtime/header hash of every input shard."""
    record = load_record(folder)
    if "sha256" not in record:
        names = [p.name for p in shards(folder)] + ([INDEX] if (folder / INDEX).exists() else [])
        record["sha256"] = sha256_files(folder, names)
    if "inputs" not in record:
        record["inputs"] = {}
        for source in [record["base"], *record["experts"]]:
            for p in shards(Path(source["path"])):
                start, _ = header(p)
                st = p.stat()
                record["inputs"][str(p.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                      "header_sha256": hashlib.sha256(p.read_bytes()[:start]).hexdigest()}
    save_record(folder, record)


def rehash(folder: Path, shard: Path) -> None:
    """Update the shard's digest in mbmerge.json, so only the other checks can fail."""
    record = load_record(folder)
    record["sha256"][shard.name] = sha(shard)
    save_record(folder, record)


def merged(family, out: Path, paths=None) -> Path:
    p = paths or family["paths"]
    mbmerge.merge("ties", base=str(p["base"]), experts=[str(p["math"]), str(p["code"])], out=out,
                  progress=False)
    record_integrity(out)
    return out


@pytest.fixture(scope="module")
def clean(family, tmp_path_factory):
    return merged(family, tmp_path_factory.mktemp("verify") / "out")


@pytest.fixture
def out(clean, tmp_path):
    """A private copy of the clean merged folder, to damage."""
    return Path(shutil.copytree(clean, tmp_path / "out"))


def test_sha256_files_is_hashlib(tmp_path):
    files = {"empty": b"", "small": b"abc", "big": os.urandom(3 * verify_mod.BLOCK + 17)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert sha256_files(tmp_path, list(files)) == {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    assert sha256_files(tmp_path, ["small"])["small"] == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_recorded_digests_are_the_files(clean):
    listed = load_record(clean)["sha256"]
    expected = {p.name: sha(p) for p in shards(clean)}
    if (clean / INDEX).exists():
        expected[INDEX] = sha(clean / INDEX)
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        expected[side] = sha(clean / side)      # copied from the base, parsed before the merge
    assert listed == expected


def test_clean_folder_verifies(clean, cli):
    assert verify(clean) == []
    assert verify(clean, inputs=True) == []
    n_shards = len(shards(clean))
    assert len(load_file(str(shards(clean)[0]))) > 0 and sum(len(load_file(str(p))) for p in shards(clean)) == N_TENSORS
    code, stdout, stderr = cli("verify", clean)
    assert (code, stderr) == (0, "")
    assert stdout == f"{clean}: OK ({N_TENSORS} tensors in {n_shards} shards, checksums match)\n"
    assert cli("verify", clean, "--quiet", "--inputs") == (0, "", "")


def test_flipped_byte_is_a_checksum_mismatch(out, cli):
    shard, offset, _ = tensor_offset(out, "model.layers.1.mlp.up_proj.weight")
    before = sha(shard)
    data = bytearray(shard.read_bytes())
    patch(shard, offset + 2, bytes([data[offset + 2] ^ 0x01]))  # lowest mantissa bit of element 1
    assert torch.isfinite(load_file(str(shard))["model.layers.1.mlp.up_proj.weight"]).all()
    problems = verify(out)
    assert len(problems) == 1, problems
    assert str(shard) in problems[0] and sha(shard) in problems[0] and before in problems[0]
    code, stdout, stderr = cli("verify", out)
    assert (code, stdout) == (1, "")
    assert stderr == f"mbmerge: verify: {problems[0]}\n"


def test_nan_in_bf16_tensor_is_named(out):
    name = "model.layers.0.self_attn.q_proj.weight"
    shard, offset, _ = tensor_offset(out, name)
    patch(shard, offset + 2 * 5, BF16_NAN)
    assert torch.isnan(load_file(str(shard))[name]).sum() == 1
    rehash(out, shard)
    problems = verify(out)
    assert len(problems) == 1, problems
    assert "1 tensor(s) hold NaN or Inf" in problems[0]
    assert f"{name} in {shard.name} (1 of {32 * 32} elements)" in problems[0]


def test_many_nonfinite_tensors_are_counted(out):
    names = sorted(n for p in shards(out) for n, t in load_file(str(p)).items() if t.ndim == 2)[:12]
    touched = set()
    for name in names:
        shard, offset, nbytes = tensor_offset(out, name)
        patch(shard, offset + nbytes - 2, b"\x80\x7f")  # +Inf in the last element
        touched.add(shard)
    for shard in touched:
        rehash(out, shard)
    (problem,) = verify(out)
    assert "12 tensor(s) hold NaN or Inf" in problem and problem.endswith(" and 2 more")
    assert sum(n in problem for n in names) == 10


def test_truncated_shard_is_named(out):
    shard = shards(out)[-1]
    os.truncate(shard, shard.stat().st_size - 100)
    problems = verify(out)
    assert any(str(shard) in p and "truncated" in p for p in problems), problems
    assert any(str(shard) in p and "sha256" in p for p in problems), problems


def test_deleted_shard_is_named(out):
    shard = shards(out)[0]
    shard.unlink()
    problems = verify(out)
    assert problems and all(shard.name in p for p in problems), problems
    assert any("missing" in p for p in problems)


def test_extra_unlisted_shard_is_named(out):
    shutil.copyfile(shards(out)[0], out / "extra.safetensors")
    problems = verify(out)
    assert len(problems) == 1, problems
    assert str(out / "extra.safetensors") in problems[0] and "not listed" in problems[0]


def test_corrupt_record_is_named(out):
    (out / "mbmerge.json").write_text('{"sha256": {')
    problems = verify(out)
    assert len(problems) == 1, problems
    assert str(out / "mbmerge.json") in problems[0] and "corrupt" in problems[0]


def test_record_with_bad_digest_names(out):
    record = load_record(out)
    record["sha256"]["../escape.safetensors"] = "00" * 32
    save_record(out, record)
    (problem,) = verify(out)
    assert "'../escape.safetensors'" in problem and "not a file name" in problem


def test_no_record_still_checks_the_rest(out, cli):
    (out / "mbmerge.json").unlink()
    assert verify(out) == [f"{out}: no mbmerge.json: checksums unknown (was this folder written by mbmerge?)"]
    name = "lm_head.weight"
    shard, offset, _ = tensor_offset(out, name)
    patch(shard, offset, BF16_NAN)
    problems = verify(out)
    assert len(problems) == 2 and "checksums unknown" in problems[0] and name in problems[1], problems
    code, stdout, stderr = cli("verify", out, "--quiet")
    assert (code, stdout) == (1, "")
    assert stderr.splitlines() == [f"mbmerge: verify: {p}" for p in problems]


def test_changed_input_is_reported(family, tmp_path, cli):
    paths = {k: Path(shutil.copytree(family["paths"][k], tmp_path / k)) for k in ("base", "math", "code")}
    folder = merged(family, tmp_path / "out", paths)
    assert cli("verify", folder, "--inputs", "-q") == (0, "", "")
    grown = shards(paths["math"])[0]
    with open(grown, "ab") as f:
        f.write(b"\0")
    assert verify(folder) == []  # inputs are checked only when asked
    (problem,) = verify(folder, inputs=True)
    assert str(grown.resolve()) in problem and f"size {grown.stat().st_size - 1} -> {grown.stat().st_size}" in problem
    shards(paths["code"])[0].unlink()
    code, _, stderr = cli("verify", folder, "--inputs")
    assert code == 1 and len(stderr.splitlines()) == 2 and "gone" in stderr


def test_inputs_not_recorded(out):
    record = load_record(out)
    del record["inputs"]
    save_record(out, record)
    assert verify(out) == []
    (problem,) = verify(out, inputs=True)
    assert "records no inputs" in problem


def test_missing_folder_is_an_error(tmp_path, cli):
    with pytest.raises(BadModel):
        verify(tmp_path / "nope")
    code, stdout, stderr = cli("verify", tmp_path / "nope")
    assert (code, stdout) == (2, "")
    assert stderr == f"mbmerge: error: {tmp_path / 'nope'}: no such folder\n"


def test_not_a_model_is_a_problem(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    code, _, stderr = cli("verify", tmp_path / "empty")
    assert code == 1 and "no safetensors files" in stderr and "checksums unknown" in stderr


def test_chunked_finiteness_on_other_dtypes(tmp_path, monkeypatch):
    """NaN/Inf found past the first chunk in F32, F16 and F8 tensors; integer tensors skipped."""
    monkeypatch.setattr(verify_mod, "CHUNK_ELEMS", 7)
    tensors = {"f32": torch.zeros(100), "f16": torch.zeros(5, 9, dtype=torch.float16),
               "f8": torch.zeros(30).to(torch.float8_e4m3fn), "i32": torch.full((40,), -1, dtype=torch.int32)}
    tensors["f32"][99] = float("inf")
    tensors["f16"][4, 8] = float("-inf")
    tensors["f8"][29] = float("nan")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    save_record(tmp_path, {"sha256": {"model.safetensors": sha(tmp_path / "model.safetensors")}})
    (problem,) = verify(tmp_path)
    assert "3 tensor(s)" in problem and "i32" not in problem
    for name, n in [("f32", 100), ("f16", 45), ("f8", 30)]:
        assert f"{name} in model.safetensors (1 of {n} elements)" in problem
