"""Property-based fuzzing (hypothesis) of engine/inputs/header.py's read_header and engine/inputs/index.py's
TensorIndex.from_folder: on arbitrary bytes, on structured mutations of valid files (length prefix,
truncation, bit flips, random JSON in every field, unicode and duplicate names, trailing bytes,
huge claims) and on hostile model folders (fuzzed index.json and shards, escaping, nested, NUL,
long and missing names, symlinks), they either return entries that satisfy the format's
invariants or raise the project's own one-line error (MbmergeError): never another exception,
and never an allocation sized by what a header claims. Also: encode_header round-trips.

Bounded and deterministic for CI: derandomized, a fixed number of examples per property, no
example database. Each example writes its files in its own TemporaryDirectory (pytest's
tmp_path is per test, not per example)."""
import json
import struct
import tempfile
import tracemalloc
from math import prod
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mbmerge.common.errors import MbmergeError
from mbmerge.engine.inputs.header import DTYPES, MAX_HEADER_BYTES, TensorEntry, encode_header, read_header
from mbmerge.engine.inputs.index import INDEX_FILE, TensorIndex

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
MEMORY_LIMIT = 1 << 20  # bytes of Python allocations read_header may peak at on these small files

# --- strategies -----------------------------------------------------------------------------

ODD_NAMES = ["__metadata__", "", "a", "\x00", "a\nb", "\ud800", "x\udfffy", "é", "名前", "🙂", "..", "/etc",
             "a" * 300]
names = st.one_of(st.text(max_size=10), st.sampled_from(ODD_NAMES))
valid_names = names.filter(lambda n: n != "__metadata__")
HUGE_INTS = [-1, 2 ** 31, 2 ** 32 - 1, 2 ** 53 + 1, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, 10 ** 12,
             10 ** 18, 10 ** 40]
ints = st.one_of(st.integers(-3, 40), st.sampled_from(HUGE_INTS), st.integers(-2 ** 70, 2 ** 70))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=6),
                    st.sampled_from(sorted(DTYPES)))
json_values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                       st.dictionaries(names, c, max_size=4)), max_leaves=10)
# values that look almost right for each field
FIELD_VALUES = {
    "dtype": st.one_of(json_values, st.sampled_from(["f32", "F128", "", "F32 ", "BOOL", "F8_E4M3", "C64"])),
    "shape": st.one_of(json_values, st.lists(ints, max_size=4),
                       st.sampled_from([[10 ** 6, 10 ** 6], [2 ** 63, 0], [2 ** 64, 2 ** 64], [0, 2 ** 200],
                                        [1] * 200, [True], [2.0], [None]])),
    "data_offsets": st.one_of(json_values, st.lists(ints, min_size=0, max_size=3),
                              st.sampled_from([[0, 4 * 10 ** 12], [2 ** 63, 2 ** 64], [0, 2 ** 64 + 8], [8, 0],
                                               [0.0, 8.0], [True, 8]])),
}
dtypes = st.sampled_from(sorted(DTYPES))
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)
metadata = st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3)
tensor_lists = st.lists(st.tuples(valid_names, dtypes, shapes), max_size=5, unique_by=lambda t: t[0])


def valid_file(tensors, meta) -> bytes:
    prefix, _ = encode_header(tensors, meta)
    size = sum(prod(s) * DTYPES[d].itemsize for _, d, s in tensors)
    return prefix + bytes(range(256)) * (size // 256) + bytes(size % 256)


def header_text(header: dict, ascii_only: bool) -> bytes:
    return json.dumps(header, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def header_dict(tensors, meta) -> dict:
    prefix, _ = encode_header(tensors, meta)
    return json.loads(prefix[8:])


@st.composite
def mutated_files(draw) -> bytes:
    """A valid file, then one or more structured mutations."""
    tensors, meta = draw(tensor_lists), draw(metadata)
    data = valid_file(tensors, meta)
    n = struct.unpack("<Q", data[:8])[0]
    header, buffer = header_dict(tensors, meta), data[8 + n:]
    ascii_only = draw(st.booleans())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["none", "prefix", "truncate", "flip", "field", "drop_field", "extra_field",
                                     "entry", "metadata", "header", "duplicate", "trailing", "new_entry",
                                     "shift", "raw_json"]))
        names_now = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
        if kind in ("field", "drop_field", "extra_field", "entry", "shift") and not names_now:
            kind = "new_entry"
        if kind == "prefix":
            new = draw(st.one_of(st.integers(0, 2 ** 64 - 1), st.sampled_from(
                [0, 1, 7, n - 1, n + 1, len(data) - 8, len(data), MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1,
                 2 ** 63, 2 ** 64 - 1]).filter(lambda v: 0 <= v < 2 ** 64)))
            return struct.pack("<Q", new) + data[8:]
        if kind == "truncate":
            return data[:draw(st.integers(0, max(len(data) - 1, 0)))]
        if kind == "flip":
            raw = bytearray(data)
            for _ in range(draw(st.integers(1, 4))):
                i = draw(st.integers(0, len(raw) - 1))
                raw[i] ^= 1 << draw(st.integers(0, 7))
            return bytes(raw)
        if kind == "none":
            continue
        if kind == "trailing":
            buffer += draw(st.binary(min_size=1, max_size=16))
        elif kind == "raw_json":  # duplicate keys, deep nesting or broken JSON, spliced as text
            text = draw(st.sampled_from([b'{"a":1,"a":2}', b"[" * 5000, b'{"a":' * 3000, b"{", b"", b" {} ",
                                         b'{"__metadata__":{"k":"v","k":"w"}}', b"\xff\xfe{}", b"null",
                                         b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}']))
            return struct.pack("<Q", len(text)) + text + buffer
        elif kind == "duplicate" and isinstance(header, dict):
            name = draw(st.sampled_from(names_now or ["__metadata__"]))
            text = header_text(header, ascii_only)
            pair = json.dumps({name: header.get(name, {})}, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
            text = text[:-1] + (b"," if len(text) > 2 else b"") + pair[1:]
            return struct.pack("<Q", len(text)) + text + buffer
        elif kind == "header":
            header = draw(json_values)
        elif not isinstance(header, dict):
            continue
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
        elif kind == "new_entry":
            header[draw(names)] = draw(st.one_of(json_values, st.fixed_dictionaries(
                {f: FIELD_VALUES[f] for f in ("dtype", "shape", "data_offsets")})))
        else:
            name = draw(st.sampled_from(names_now))
            entry = header[name]
            if kind == "entry" or not isinstance(entry, dict):
                header[name] = draw(json_values)
            elif kind == "field":
                field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
                entry[field] = draw(FIELD_VALUES[field])
            elif kind == "drop_field" and entry:
                del entry[draw(st.sampled_from(sorted(entry)))]
            elif kind == "extra_field":
                entry[draw(names)] = draw(json_values)
            elif kind == "shift" and isinstance(entry.get("data_offsets"), list):
                entry["data_offsets"] = [o + draw(st.integers(-9, 9)) if type(o) is int else o
                                         for o in entry["data_offsets"]]
    text = header_text(header, ascii_only)
    text += b" " * draw(st.sampled_from([0, 0, -(8 + len(text)) % 8]))
    return struct.pack("<Q", len(text)) + text + buffer


# --- checks ---------------------------------------------------------------------------------

def check_entries(path: Path, entries: dict, meta: dict) -> None:
    """The invariants of an accepted file: packed, in bounds, sizes from dtype and shape."""
    raw = path.read_bytes()
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    assert start <= len(raw)
    assert isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert isinstance(entries, dict) and "__metadata__" not in entries
    pos = start
    for e in sorted(entries.values(), key=lambda e: (e.offset, e.nbytes)):
        assert isinstance(e, TensorEntry) and entries[e.name] is e and e.file == path
        assert e.dtype in DTYPES and isinstance(e.shape, tuple)
        assert all(type(s) is int and 0 <= s < 2 ** 63 for s in e.shape)
        assert e.nbytes == prod(e.shape) * DTYPES[e.dtype].itemsize == e.numel * DTYPES[e.dtype].itemsize
        assert e.offset == pos, "tensors must be packed: no overlap, no hole"
        pos += e.nbytes
    assert pos == len(raw), "the buffer ends with the last tensor"


def parse(path: Path):
    """read_header under tracemalloc: its result, or the MbmergeError it raised."""
    tracemalloc.start()
    try:
        result = read_header(path)
    except MbmergeError as e:
        result = e
    finally:  # any other exception propagates and fails the test
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT + 8 * path.stat().st_size, f"read_header peaked at {peak} bytes"
    if isinstance(result, MbmergeError):
        msg = str(result)
        assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    else:
        check_entries(path, *result)
    return result


def check_file(data: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        path.write_bytes(data)
        result = parse(path)
        if not isinstance(result, MbmergeError):
            agrees_with_safetensors(path, result[0])
        return result


def agrees_with_safetensors(path: Path, entries: dict) -> None:
    """What we accept, the safetensors library reads the same way (where it reads it at all: it
    refuses names that are not valid Unicode, and headers not starting with '{')."""
    try:
        f = safe_open(str(path), "pt")
    except Exception:
        return
    with f:
        assert set(f.keys()) == set(entries)
        for name, e in entries.items():
            s = f.get_slice(name)
            assert (s.get_dtype(), tuple(s.get_shape())) == (e.dtype, e.shape)


def outcome(result) -> None:
    """Tally outcomes for `pytest --hypothesis-show-statistics`."""
    event("accepted" if isinstance(result, tuple) else type(result).__name__)


# --- read_header ----------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=200))
@example(b"")
@example(b"\xff" * 8)
@example(struct.pack("<Q", 2 ** 63) + b"{}")
@example(struct.pack("<Q", 2) + b"{}")
def test_read_header_arbitrary_bytes(data):
    outcome(check_file(data))


@FUZZ
@given(st.binary(max_size=120))
def test_read_header_arbitrary_header_bytes(text):
    """A well-formed length prefix around arbitrary header bytes."""
    outcome(check_file(struct.pack("<Q", len(text)) + text))


@FUZZ
@given(mutated_files())
def test_read_header_mutated_valid_files(data):
    outcome(check_file(data))


@pytest.mark.parametrize("header, buffer, accepted", [
    ({"a": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6], "data_offsets": [0, 4 * 10 ** 12]}}, b"", False),
    ({"a": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6], "data_offsets": [0, 4 * 10 ** 12]}}, bytes(64), False),
    ({"a": {"dtype": "F64", "shape": [2 ** 62, 2 ** 62], "data_offsets": [0, 8]}}, bytes(8), False),
    ({"a": {"dtype": "F32", "shape": [2 ** 63, 0], "data_offsets": [0, 0]}}, b"", False),  # torch sizes are int64
    ({"a": {"dtype": "F32", "shape": [2 ** 62] * 20000 + [0], "data_offsets": [0, 0]}}, b"", True),
    ({"a": {"dtype": "U8", "shape": [2 ** 62] * 20000, "data_offsets": [0, 1]}}, bytes(1), False),
    ({"a": {"dtype": "F32", "shape": [9 ** 1000, 0], "data_offsets": [0, 0]}}, b"", False),
    ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [2 ** 64, 2 ** 64 + 1]}}, bytes(1), False),
    ({"a": {"dtype": [], "shape": [1], "data_offsets": [0, 1]}}, bytes(1), False),
    ({"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}, bytes(4), False),
])
def test_huge_claims_bounded(header, buffer, accepted):
    """Headers claiming 10^12 elements, dimensions past int64, or thousands of huge dimensions
    (whose product would be a megabyte-sized integer, built in quadratic time): a clean error
    (or, for an empty tensor, its entry), in small memory and no time."""
    text = json.dumps(header).encode()
    result = check_file(struct.pack("<Q", len(text)) + text + buffer)
    assert isinstance(result, MbmergeError) != accepted, result
    if accepted:
        assert result[0]["a"].numel == 0


@pytest.mark.parametrize("claim", [2 ** 63, 2 ** 64 - 1, MAX_HEADER_BYTES + 1, 10 ** 12])
def test_huge_length_prefix_not_allocated(claim):
    result = check_file(struct.pack("<Q", claim) + b'{"a": 1}')
    assert isinstance(result, MbmergeError) and f"header length {claim}" in str(result)


@FUZZ
@given(tensor_lists, metadata)
def test_encode_header_round_trip(tensors, meta):
    """Headers written by encode_header parse back to the same entries, in order, and the
    safetensors library reads the same names, dtypes and shapes."""
    prefix, offsets = encode_header(tensors, meta)
    assert len(prefix) % 8 == 0 and struct.unpack("<Q", prefix[:8])[0] == len(prefix) - 8
    result = check_file(valid_file(tensors, meta))
    assert not isinstance(result, MbmergeError), result
    entries, got_meta = result
    assert got_meta == meta
    assert [(e.name, e.dtype, e.shape, e.offset - len(prefix)) for e in entries.values()] == \
        [(n, d, s, o) for (n, d, s), o in zip(tensors, offsets)]


# --- TensorIndex.from_folder ----------------------------------------------------------------

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors",
          "a.safetensors", "README.md", "weird name\n.safetensors"]
TENSOR_NAMES = ["w", "v", "model.embed_tokens.weight", "lm_head.weight", "é"]
LINKS = {"inside.safetensors": "model.safetensors", "outside.safetensors": "../outside.safetensors",
         "abs.safetensors": None, "loop.safetensors": "loop.safetensors", "dangling.safetensors": "nope",
         "chain.safetensors": "outside.safetensors", "config.json": "../secret.json", "dir.safetensors": "sub"}
shard_values = st.one_of(
    st.sampled_from(SHARDS + sorted(LINKS) + [
        "../outside.safetensors", "sub/x.safetensors", "./model.safetensors", "sub/../model.safetensors",
        "x\x00.safetensors", "a" * 300 + ".safetensors", "b" * 5000, "", ".", "..", "/", "sub",
        "missing.safetensors", "\ud800.safetensors", "..\\outside.safetensors", INDEX_FILE]),
    st.text(max_size=12), json_values)
GARBAGE_INDEXES = [b"[" * 100_000, b'{"weight_map":' * 100_000, b"\xff\xfe", b"", b'{"weight_map": {"w": "a"',
                   b'{"weight_map": {"w": "model.safetensors", "w": "a.safetensors"}}']


@st.composite
def index_texts(draw, shards: dict) -> bytes | None:
    """None, the index the shards imply (as is or perturbed), a fuzzed weight_map, or garbage."""
    mode = draw(st.sampled_from(["none", "derived", "perturbed", "perturbed", "fuzzed", "garbage"]))
    if mode == "none":
        return None
    if mode == "garbage":
        return draw(st.one_of(st.sampled_from(GARBAGE_INDEXES), st.builds(lambda v: json.dumps(v).encode(), json_values),
                              st.builds(lambda v: json.dumps({"weight_map": v}).encode(), json_values)))
    if mode == "fuzzed":
        weight_map = draw(st.dictionaries(st.one_of(st.sampled_from(TENSOR_NAMES), names), shard_values, max_size=6))
    else:
        weight_map = {t: shard for shard, (tensors, _, _) in shards.items() for t, _, _ in tensors}
        for _ in range(draw(st.integers(1, 2)) if mode == "perturbed" else 0):
            what = draw(st.sampled_from(["value", "add", "drop"]))
            if what == "drop" and weight_map:
                del weight_map[draw(st.sampled_from(sorted(weight_map)))]
            elif what == "value" and weight_map:
                weight_map[draw(st.sampled_from(sorted(weight_map)))] = draw(shard_values)
            else:
                weight_map[draw(st.one_of(st.sampled_from(TENSOR_NAMES), names))] = draw(shard_values)
    extra = draw(st.one_of(st.just({}), json_values))
    return json.dumps({"metadata": extra, "weight_map": weight_map}).encode()


shard_files = st.dictionaries(
    st.sampled_from(SHARDS + ["sub/x.safetensors"]),
    st.tuples(st.lists(st.tuples(st.sampled_from(TENSOR_NAMES), dtypes, shapes), max_size=3, unique_by=lambda t: t[0]),
              st.sampled_from(["valid", "valid", "truncate", "flip", "garbage"]), st.integers(0, 10 ** 6)),
    max_size=4)


def build_folder(root: Path, shards: dict, links: list, index: bytes | None) -> Path:
    folder = root / "m"
    (folder / "sub").mkdir(parents=True)
    (root / "outside.safetensors").write_bytes(valid_file([("w", "F32", (2,))], {}))
    (root / "secret.json").write_text("{}")
    for name, (tensors, how, seed) in shards.items():
        data = valid_file(tensors, {"format": "pt"})
        if how == "truncate":
            data = data[:seed % (len(data) + 1)]
        elif how == "flip":
            raw = bytearray(data)
            raw[seed % len(raw)] ^= 1 << (seed % 8)
            data = bytes(raw)
        elif how == "garbage":
            data = seed.to_bytes(8, "little") + b"{}"
        (folder / name).write_bytes(data)
    for name in links:
        target = LINKS[name] or str(root / "outside.safetensors")
        (folder / name).symlink_to(target)
    if index is not None:
        (folder / INDEX_FILE).write_bytes(index)
    return folder


def check_index(folder: Path, ix) -> None:
    root = folder.resolve()
    assert ix.shards == tuple(sorted(ix.shards)) or not ix.sharded
    for shard in ix.shards:
        path = folder / shard
        assert "/" not in shard and shard.endswith(".safetensors") and path.is_file()
        assert path.resolve().is_relative_to(root)
    for name, e in ix.tensors.items():
        assert e.name == name and e.file.parent == folder and e.file.name in ix.shards
    for shard in ix.shards:
        entries, meta = read_header(folder / shard)  # each shard re-checked on its own
        check_entries(folder / shard, entries, meta)
        assert all(ix.tensors[n].offset == e.offset for n, e in entries.items())
    for link in folder.iterdir():  # no symlink out of the folder survives
        if link.is_symlink() and not link.name.startswith("."):
            try:
                assert link.resolve().is_relative_to(root)
            except RuntimeError:  # a loop (Python < 3.13): refused, so never here
                raise AssertionError(f"{link} is a symlink loop") from None
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        assert ix.sharded and set(ix.shards) == set(weight_map.values())
        assert all(ix.tensors[n].file.name == s for n, s in weight_map.items())


ONE_SHARD = {"model.safetensors": ([("w", "F32", (2,))], "valid", 0)}


def wm(shard: str) -> bytes:
    return json.dumps({"weight_map": {"w": shard}}).encode()


@settings(FUZZ, max_examples=400)
@given(st.data())
def test_from_folder_fuzzed(data):
    shards = data.draw(shard_files, "shards")
    links = data.draw(st.one_of(st.just([]), st.lists(st.sampled_from(sorted(LINKS)), unique=True, max_size=2)),
                      "links")
    event(from_folder_case(shards, links, data.draw(index_texts(shards), "index")))


# What the fuzzer found before the fixes in engine/inputs/index.py, kept as fixed cases.
@pytest.mark.parametrize("shards, links, index", [
    (ONE_SHARD, [], wm("x\x00.safetensors")),        # ValueError: embedded null byte
    (ONE_SHARD, [], wm("b" * 5000)),                   # OSError: file name too long
    (ONE_SHARD, [], wm("\ud800.safetensors")),        # UnicodeEncodeError: surrogates not allowed
    (ONE_SHARD, [], b"[" * 100_000),                   # RecursionError
    (ONE_SHARD, ["loop.safetensors"], None),           # a symlink loop left in the folder
    (ONE_SHARD, ["loop.safetensors"], wm("loop.safetensors")),  # RuntimeError: symlink loop
    (ONE_SHARD, ["config.json"], None),                # a side file linking outside, copied to the output
    ({"weird name\n.safetensors": ([], "truncate", 0)}, [], None),  # a two-line message
    ({**ONE_SHARD, "README.md": ([("v", "F32", (1,))], "valid", 0)}, [],  # an output shard mbmerge overwrites
     json.dumps({"weight_map": {"w": "model.safetensors", "v": "README.md"}}).encode()),
], ids=["nul", "long_name", "surrogate", "deep_json", "loop_left", "loop_shard", "side_file_outside",
        "newline_name", "shard_named_readme"])
def test_from_folder_found_cases(shards, links, index):
    assert from_folder_case(shards, links, index) != "accepted"


def from_folder_case(shards, links, index):
    """A model folder with fuzzed shards, symlinks and index.json: a valid TensorIndex whose shards
    all lie in the folder, or a one-line MbmergeError naming the folder."""
    with tempfile.TemporaryDirectory() as d:
        folder = build_folder(Path(d), shards, links, index)
        try:
            ix = TensorIndex.from_folder(folder, "expert x")
        except MbmergeError as e:
            msg = str(e)
            assert msg.startswith(f"expert x {folder}") and "\n" not in msg, msg
            return f"{type(e).__name__}: {msg.removeprefix(f'expert x {folder}').split(':')[1][:40]}"
        check_index(folder, ix)
        return "accepted"
