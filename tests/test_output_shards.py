"""Output shaping: --out-shard-size (mergekit's shard filling, transformers' shard names and index) and
--copy-tokenizer/--no-copy-tokenizer, through the library and the command line, against a grouping
and a file list worked out here."""
import json
import struct
from pathlib import Path

import pytest
import torch

import mbmerge
from mbmerge.engine.output.verify import verify
from mbmerge.common.errors import BadParameter
from mbmerge.engine.plan import parse_shard_size
from conftest import read_model


def read_order(folder: Path) -> list[tuple[str, int]]:
    """(name, bytes) of every tensor of a model folder in file order: its shards as the index lists
    them, each by data offset, read from the raw safetensors headers."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    return [entry for f in files for entry in read_order_of_file(folder / f)]


def mergekit_groups(order: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """mergekit's TensorWriter: a tensor that would push a non-empty shard past `limit` starts a new one."""
    groups, size = [[]], 0
    for name, nbytes in order:
        if groups[-1] and size + nbytes > limit:
            groups, size = groups + [[]], 0
        groups[-1].append(name)
        size += nbytes
    return groups


def merge(family, out: Path, **options) -> Path:
    p = family["paths"]
    return mbmerge.merge("ties", base=str(p["base"]), experts=[str(p["math"]), str(p["code"])], out=out,
                         progress=False, density=0.3, **options)


def shard_names(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.glob("*.safetensors"))


def test_shards_are_filled_as_mergekit_fills_them_and_hold_the_same_tensors(family, tmp_path):
    order = read_order(family["paths"]["base"])
    limit = sum(n for _, n in order) // 3                       # about three shards, some tensors overflowing
    out = merge(family, tmp_path / "resharded", out_shard_size=limit)
    groups = mergekit_groups(order, limit)
    assert len(groups) >= 3
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    assert shard_names(out) == names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {t: f for f, g in zip(names, groups) for t in g}
    assert index["metadata"]["total_size"] == sum(n for _, n in order)
    for f, g in zip(names, groups):
        assert [n for n, _ in read_order_of_file(out / f)] == g      # in read order within each shard
    default = read_model(merge(family, tmp_path / "as-base"))
    resharded = read_model(out)
    assert default.keys() == resharded.keys() and all(torch.equal(default[k], resharded[k]) for k in default)
    card = json.loads((out / "mbmerge.json").read_text())
    assert card["out_shard_size"] == limit and card["shards"] == len(groups)
    assert f"--out-shard-size {limit}" in card["command"]
    assert verify(out) == []


def read_order_of_file(path: Path) -> list[tuple[str, int]]:
    """(name, bytes) of one safetensors file's tensors by data offset, from its raw header."""
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    header.pop("__metadata__", None)
    return [(n, e["data_offsets"][1] - e["data_offsets"][0])
            for n, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])]


def test_transformers_loads_a_resharded_merge(family, tmp_path):
    from transformers import AutoModelForCausalLM
    out = merge(family, tmp_path / "m", out_shard_size="20k")
    assert len(shard_names(out)) > 2
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    merged, state = read_model(out), model.state_dict()
    shared = [k for k in merged if k in state]
    assert len(shared) == len(merged) and all(torch.equal(state[k], merged[k]) for k in shared)


def test_everything_in_one_shard_is_model_safetensors_without_an_index(family, tmp_path):
    out = merge(family, tmp_path / "one", out_shard_size="5B")
    assert shard_names(out) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert len(read_model(out)) == len(read_order(family["paths"]["base"]))


def test_no_copy_tokenizer_leaves_the_tokenizer_out(family, tmp_path):
    kept = merge(family, tmp_path / "with")
    left = merge(family, tmp_path / "without", copy_tokenizer=False)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"} <= \
        {f.name for f in kept.iterdir()}
    files = {f.name for f in left.iterdir()}
    assert "config.json" in files and "generation_config.json" in files
    assert not {"tokenizer.json", "tokenizer_config.json"} & files
    card = json.loads((left / "mbmerge.json").read_text())
    assert card["copy_tokenizer"] is False and "--no-copy-tokenizer" in card["command"]
    assert verify(left) == []


def test_the_command_line_takes_both_options(family, tmp_path, run_main):
    p = family["paths"]
    code, out, err = run_main("--method", "task_arithmetic", "--base", p["base"], "--experts",
                              f"{p['math']},{p['code']}", "--out", tmp_path / "cli", "--out-shard-size", "20k",
                              "--no-copy-tokenizer")
    assert code == 0, err
    assert "merged model written to" in out
    assert len(shard_names(tmp_path / "cli")) > 2 and not (tmp_path / "cli" / "tokenizer.json").exists()


@pytest.mark.parametrize("size", ["abc", "0", "-5B", "5XB", "1e9"])
def test_a_bad_shard_size_is_one_line_and_writes_nothing(family, tmp_path, run_main, size):
    p = family["paths"]
    code, out, err = run_main("--method", "ties", "--base", p["base"], "--experts", f"{p['math']},{p['code']}",
                              "--out", tmp_path / "bad", "--out-shard-size", size)
    assert code != 0
    assert "--out-shard-size" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text,size", [("5B", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                       ("1.5k", 1500), ("4096", 4096), (4096, 4096), ("3m", 3 * 10**6)])
def test_shard_sizes_read_as_mergekit_and_transformers_write_them(text, size):
    assert parse_shard_size(text) == size


def test_a_bad_shard_size_raises_bad_parameter():
    with pytest.raises(BadParameter, match="--out-shard-size 'x'"):
        parse_shard_size("x")
