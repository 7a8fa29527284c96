"""The plan: file order, chunk sizes from the budget, and output offsets that match the header."""
import json
import struct

import pytest

from mbmerge.common.errors import BadParameter
from mbmerge.engine.inputs.index import TensorIndex
from mbmerge.engine.plan import chunk_elems, make_plan, parse_size
from mbmerge.methods import CHUNK_ALIGN


def test_parse_size():
    assert parse_size("2GB") == 2 << 30 and parse_size("512MiB") == 512 << 20
    assert parse_size("1.5k") == 1536 and parse_size("4096") == 4096 and parse_size(7) == 7
    with pytest.raises(BadParameter, match="not a size"):
        parse_size("lots")


def test_chunk_size_follows_the_budget():
    assert chunk_elems(2 << 30, 3) == 1 << 17                    # a roomy budget: the cache-sized chunk
    small = chunk_elems(1 << 20, 3)                              # 1 MiB, 3 inputs: 60 bytes per element
    assert small == (1 << 20) // 60 // CHUNK_ALIGN * CHUNK_ALIGN == 16384
    assert chunk_elems(10, 3) == CHUNK_ALIGN                     # never below one aligned granule


def test_plan_reads_in_file_order_and_offsets_match_the_header(family):
    index = TensorIndex.from_folder(family["paths"]["base"])
    plan = make_plan(index, n_inputs=3, budget=100_000, keep_base="lm_head")
    order = [(index.shards.index(t.ref.file.name), t.ref.offset) for t in plan.tensors]
    assert order == sorted(order)
    for t in plan.tensors:
        assert t.chunks[0][0] == 0 and t.chunks[-1][1] == t.ref.numel
        assert all(a % CHUNK_ALIGN == 0 and b - a <= plan.chunk_elems for a, b in t.chunks)
        assert t.merge == ("lm_head" not in t.name)
    for shard in plan.shards:
        (n,) = struct.unpack("<Q", shard.header[:8])
        header = json.loads(shard.header[8:8 + n])
        mine = [t for t in plan.tensors if t.shard == shard.name]
        assert [t.out_offset - 8 - n for t in mine] == [header[t.name]["data_offsets"][0] for t in mine]
        assert shard.size == 8 + n + sum(t.out_nbytes for t in mine)
        assert len(shard.header) % 8 == 0
