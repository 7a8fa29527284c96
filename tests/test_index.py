"""engine/inputs/header.py and engine/inputs/index.py: golden header bytes, a round trip through the
safetensors library, every kind of corrupt or hostile header, and unsafe model folders.

BAD_HEADERS and BAD_FOLDERS are also run through the command line in test_cli.py."""
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import base_tensors, write_model
from mbmerge.common.errors import BadHeader, BadModel, BadOffsets, MissingTensor, ShapeMismatch
from mbmerge.engine.inputs.header import encode_header, read_header
from mbmerge.engine.inputs.index import TensorIndex, check_agreement

SHARD1 = "model-00001-of-00002.safetensors"


def spec(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def st(header, data=b"", length=None) -> bytes:
    """Raw safetensors bytes: length prefix, header (a dict or raw JSON bytes), data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def two(b_offsets=(8, 20), a_offsets=(0, 8)):
    return {"a": spec(offsets=a_offsets), "b": spec(shape=(3,), offsets=b_offsets)}


A = json.dumps(spec()).encode()

# name -> (file bytes, error class, fragments the message must hold besides the file path)
BAD_HEADERS = {
    "shorter_than_8_bytes": (b"\x10\x00\x00", BadHeader, ["is 3 bytes, too short"]),
    "length_past_end": (struct.pack("<Q", 1000) + b"{}", BadHeader, ["header length 1000", "(10 bytes)"]),
    "invalid_json": (st(b'{"a": {"dtype": '), BadHeader, ["not valid UTF-8 JSON"]),
    "not_utf8": (st(b'{"\xff\xfe": 1}'), BadHeader, ["not valid UTF-8 JSON"]),
    "json_array": (st(b"[1, 2]"), BadHeader, ["header JSON is not an object"]),
    "duplicate_name": (st(b'{"a": ' + A + b', "a": ' + A + b"}", bytes(8)), BadHeader, ["'a' twice"]),
    "unknown_dtype": (st({"a": spec(dtype="F128")}, bytes(8)), BadHeader, ["tensor 'a'", "unknown dtype 'F128'"]),
    "negative_shape": (st({"a": spec(shape=(-2,))}, bytes(8)), BadHeader, ["tensor 'a'", "shape [-2]"]),
    "float_shape": (st({"a": spec(shape=(2.0,))}, bytes(8)), BadHeader, ["tensor 'a'", "shape [2.0]"]),
    "huge_int_shape": (st(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}',
                          bytes(8)), BadHeader, ["not valid UTF-8 JSON"]),
    "missing_field": (st({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), BadHeader,
                      ["tensor 'a'", "exactly dtype, shape and data_offsets"]),
    "reversed_offsets": (st({"a": spec(offsets=(8, 0))}, bytes(8)), BadOffsets, ["tensor 'a'", "[8, 0]"]),
    "offsets_past_end": (st(two(), bytes(12)), BadOffsets, ["tensor 'b'", "ends at buffer offset 20", "12 bytes"]),
    "overlapping": (st(two(b_offsets=(4, 16)), bytes(16)), BadOffsets,
                    ["tensor 'b'", "buffer offset 4 overlaps"]),
    "hole": (st(two(b_offsets=(12, 24)), bytes(24)), BadOffsets, ["tensor 'b'", "buffer offset 12 leaves a hole"]),
    "hole_at_start": (st({"a": spec(offsets=(4, 12))}, bytes(12)), BadOffsets, ["tensor 'a'", "leaves a hole"]),
    "trailing_garbage": (st(two(), bytes(24)), BadOffsets, ["data ends at buffer offset 20", "24 bytes"]),
    "nbytes_not_numel_x_itemsize": (st({"a": spec(offsets=(0, 12))}, bytes(12)), BadOffsets,
                                    ["tensor 'a'", "holds 12 bytes but shape [2] of F32 needs 8"]),
    "metadata_not_strings": (st({"__metadata__": {"format": 1}, **two()}, bytes(20)), BadHeader,
                             ["__metadata__ must map strings to strings"]),
    "metadata_not_object": (st({"__metadata__": [], **two()}, bytes(20)), BadHeader,
                            ["__metadata__ must map strings to strings"]),
}


def write_bad(path: Path, case: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(BAD_HEADERS[case][0])
    return path


def test_encode_header_golden_bytes():
    prefix, offsets = encode_header([("a", "F32", (2,)), ("b", "BF16", (1, 3))], {"format": "pt"})
    text = (b'{"__metadata__":{"format":"pt"},'
            b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
            b'"b":{"dtype":"BF16","shape":[1,3],"data_offsets":[8,14]}}')
    assert len(text) == 142
    padded = text + b"  "  # 8 + 142 + 2 = 152, a multiple of 8; 144 = 0x90
    assert prefix == b"\x90\x00\x00\x00\x00\x00\x00\x00" + padded
    assert offsets == [0, 8]


def test_encoded_header_loads_with_safetensors(tmp_path):
    prefix, _ = encode_header([("a", "F32", (2,)), ("b", "BF16", (1, 3))], {"format": "pt"})
    a, b = torch.tensor([1.5, -2.0]), torch.tensor([[0.5, 3.0, -1.0]], dtype=torch.bfloat16)
    path = tmp_path / "x.safetensors"
    path.write_bytes(prefix + a.numpy().tobytes() + b.view(torch.int16).numpy().tobytes())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("a"), a) and torch.equal(f.get_tensor("b"), b)
    entries, meta = read_header(path)
    assert (entries["a"].offset, entries["b"].offset) == (152, 160)


def test_read_header_round_trip(tmp_path):
    w = torch.arange(15, dtype=torch.float16).view(3, 5)
    path = tmp_path / "rt.safetensors"
    save_file({"w": w, "b": torch.arange(4), "e": torch.zeros(0, 2)}, str(path), metadata={"format": "pt"})
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    entries, meta = read_header(path)
    assert meta == {"format": "pt"}
    # safetensors packs by descending alignment, then name: b (I64, 32 B), e (empty), w (F16, 30 B)
    got = {k: (e.offset, e.nbytes, e.dtype, e.shape, e.torch_dtype) for k, e in entries.items()}
    assert got == {"b": (8 + n, 32, "I64", (4,), torch.int64),
                   "e": (8 + n + 32, 0, "F32", (0, 2), torch.float32),
                   "w": (8 + n + 32, 30, "F16", (3, 5), torch.float16)}
    assert entries["w"].numel == 15 and entries["w"].file == path
    data = path.read_bytes()
    assert torch.equal(torch.frombuffer(bytearray(data[8 + n + 32:8 + n + 62]), dtype=torch.float16).view(3, 5), w)


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_bad_header_refused(tmp_path, case):
    path = write_bad(tmp_path / "model.safetensors", case)
    _, cls, fragments = BAD_HEADERS[case]
    with pytest.raises(cls) as e:
        read_header(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    for f in fragments:
        assert f in msg


def test_header_length_over_limit_is_not_read(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 150_000_000) + b"{")
        f.truncate(200_000_000)  # sparse: the claim fits in the file but exceeds the 100 MB limit
    with pytest.raises(BadHeader, match="header length 150000000 exceeds .* 100000000-byte limit"):
        read_header(path)


def test_zero_size_tensors_between_others(tmp_path):
    path = tmp_path / "z.safetensors"
    path.write_bytes(st({"a": spec(), "z": spec(shape=(0, 4), offsets=(8, 8)), "b": spec(offsets=(8, 16))},
                        bytes(16)))
    entries, _ = read_header(path)
    n = len(path.read_bytes()) - 16
    assert [(k, e.offset) for k, e in entries.items()] == [("a", n), ("z", n + 8), ("b", n + 8)]


# Model folders. Each builder breaks a copy of a good sharded folder and returns
# (error class, fragments the message must hold).

def _weight_map(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _set_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _redirect_first(folder, target):
    index = _weight_map(folder)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = target
    _set_index(folder, index)


def index_escapes(folder):
    shutil.copy(folder / SHARD1, folder.parent / "x.safetensors")
    _redirect_first(folder, "../x.safetensors")
    return BadModel, ["'../x.safetensors' points outside the model folder"]


def index_absolute(folder):
    outside = folder.parent / "abs.safetensors"
    shutil.copy(folder / SHARD1, outside)
    _redirect_first(folder, str(outside))
    return BadModel, [f"{str(outside)!r} points outside the model folder"]


def symlink_outside(folder):
    outside = folder.parent / "elsewhere.safetensors"
    (folder / SHARD1).rename(outside)
    (folder / SHARD1).symlink_to(outside)
    return BadModel, [f"'{SHARD1}' points outside the model folder"]


def index_lists_absent_tensor(folder):
    index = _weight_map(folder)
    index["weight_map"]["model.extra.weight"] = SHARD1
    _set_index(folder, index)
    return MissingTensor, [f"index.json lists tensor 'model.extra.weight' in {SHARD1} but that file does not hold it"]


def index_corrupt_json(folder):
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    return BadModel, ["model.safetensors.index.json is not a JSON object with a weight_map"]


def index_weight_map_list(folder):
    _set_index(folder, {"weight_map": [SHARD1]})
    return BadModel, ["index.json's weight_map must map tensor names to file names"]


def index_empty(folder):
    _set_index(folder, {"metadata": {}, "weight_map": {}})
    return BadModel, ["model.safetensors.index.json lists no tensors"]


def index_missing_shard(folder):
    (folder / SHARD1).unlink()
    return BadModel, [f"shard {SHARD1} is missing"]


def bad_shard_header(folder):
    (folder / SHARD1).write_bytes(BAD_HEADERS["hole"][0])
    return BadOffsets, [f"{folder / SHARD1}: tensor 'b' at buffer offset 12 leaves a hole"]


def pickle_only(folder):
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")
    return BadModel, ["only pickle checkpoints (pytorch_model.bin)", "never loads"]


def no_safetensors(folder):
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    return BadModel, ["no safetensors files"]


def missing_folder(folder):
    shutil.rmtree(folder)
    return BadModel, ["no such folder"]


def file_not_folder(folder):
    shutil.rmtree(folder)
    folder.write_bytes(b"x")
    return BadModel, ["not a folder"]


BAD_FOLDERS = {f.__name__: f for f in [
    index_escapes, index_absolute, symlink_outside, index_lists_absent_tensor, index_corrupt_json,
    index_weight_map_list, index_empty, index_missing_shard, bad_shard_header, pickle_only,
    no_safetensors, missing_folder, file_not_folder]}


def bad_folder(family, root: Path, case: str):
    folder = root / "models" / case
    shutil.copytree(family["paths"]["base"], folder)
    cls, fragments = BAD_FOLDERS[case](folder)
    return folder, cls, fragments


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_folder_refused(family, tmp_path, case):
    folder, cls, fragments = bad_folder(family, tmp_path, case)
    with pytest.raises(cls) as e:
        TensorIndex.from_folder(folder, "expert x")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"expert x {folder}")
    for f in fragments:
        assert f in msg


def test_index_of_sharded_and_single_file(family, tmp_path):
    ix = TensorIndex.from_folder(family["paths"]["base"], "base")
    names = list(base_tensors())
    assert ix.sharded and ix.shards == (SHARD1, "model-00002-of-00002.safetensors")
    assert sorted(ix.tensors) == sorted(names)
    assert {ix.tensors[n].file.name for n in names[0::2]} == {SHARD1}
    one = write_model(tmp_path / "one", {"w": torch.ones(2, 3)}, dtype=torch.float16, shards=1)
    ix = TensorIndex.from_folder(one)
    assert not ix.sharded and ix.shards == ("model.safetensors",)
    assert (ix.tensors["w"].dtype, ix.tensors["w"].shape, ix.tensors["w"].nbytes) == ("F16", (2, 3), 12)


def test_symlinked_shard_inside_folder_accepted(family, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(family["paths"]["base"], folder)
    (folder / SHARD1).rename(folder / "blob-1")
    (folder / SHARD1).symlink_to("blob-1")
    assert len(TensorIndex.from_folder(folder).tensors) == len(list(base_tensors()))


def test_check_agreement_lists_every_problem(tmp_path):
    base = {"w": torch.ones(2, 3), "v": torch.ones(4), "u": torch.ones(1)}
    b = TensorIndex.from_folder(write_model(tmp_path / "b", base, shards=1))
    shaped = TensorIndex.from_folder(write_model(tmp_path / "s", {**base, "w": torch.ones(3, 2)}, shards=1))
    typed = TensorIndex.from_folder(write_model(tmp_path / "t", base, dtype=torch.float16, shards=1))
    ints = TensorIndex.from_folder(write_model(tmp_path / "i", base, dtype=torch.int32, shards=1))
    lacking = TensorIndex.from_folder(write_model(tmp_path / "l", {"w": base["w"], "x": torch.ones(1)}, shards=1))
    check_agreement(b, {"t": typed})          # another float width merges (in float32)
    with pytest.raises(ShapeMismatch) as e:
        check_agreement(b, {"s": shaped, "t": typed, "i": ints})
    msg = str(e.value)
    assert "\n" not in msg
    assert f"expert 's' ({tmp_path / 's'}) differs from base in 1 tensor(s) (w BF16[3, 2] vs BF16[2, 3])" in msg
    assert f"expert 'i' ({tmp_path / 'i'}) differs from base in 3 tensor(s) (u I32[1] vs BF16[1], v I32[4] vs " \
           f"BF16[4], ...)" in msg
    assert "'t'" not in msg and msg.endswith("the experts are not fine-tunes of the same model")
    with pytest.raises(MissingTensor) as e:
        check_agreement(b, {"l": lacking})
    msg = str(e.value)
    assert f"expert 'l' ({tmp_path / 'l'}) lacks 2 tensor(s) (u, v) that base has" in msg
    assert "has 1 tensor(s) (x) that base lacks" in msg
    check_agreement(b, {"same": TensorIndex.from_folder(tmp_path / "b")})


def test_input_files_untouched_by_index(family):
    folder = family["paths"]["base"]
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in folder.iterdir()}
    TensorIndex.from_folder(folder)
    assert before == {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in folder.iterdir()}
