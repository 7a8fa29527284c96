"""The device layer on a machine without CUDA: --device choices, the threaded writer's order,
journaling and errors, and that a threaded merge writes the same bytes as a synchronous one.
(tests/test_cuda.py runs the CUDA path where a GPU is present.)"""
import json

import pytest
import torch

import mbmerge
from mbmerge.engine.device import Output, resolve_device
from mbmerge.common.errors import BadParameter
from conftest import read_model


def test_device_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BadParameter, match="choose cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_refused_in_one_line_without_a_gpu(family, tmp_path, run_main):
    p = family["paths"]
    code, _, err = run_main("--method", "ties", "--base", p["base"], "--experts", p["math"],
                            "--out", tmp_path / "out", "--device", "cuda", "-q")
    assert code == 2 and err.count("\n") == 1
    assert "--device cuda: CUDA is not available" in err and not (tmp_path / "out").exists()


class Recorder:
    def __init__(self, fail_at=None):
        self.events, self.fail_at = [], fail_at

    def write(self, t, start, values):
        if len(self.events) == self.fail_at:
            raise OSError(5, "Input/output error", "shard")
        self.events.append(("write", t, start, values.tolist()))

    def done(self, t, info=None):
        self.events.append(("done", t))


def _feed(out: Output):
    for t in ["a", "b"]:
        for start in range(0, 300, 100):
            out.write(t, start, torch.arange(start, start + 100, dtype=torch.float32))
        out.tensor_done(t)


@pytest.mark.parametrize("threaded", [False, True])
def test_writes_and_journal_keep_their_order(threaded):
    rec = Recorder()
    out = Output(rec.write, rec.done, threaded=threaded, device=torch.device("cpu"))
    _feed(out)
    out.close()
    expected = []
    for t in ["a", "b"]:
        expected += [("write", t, s, list(map(float, range(s, s + 100)))) for s in range(0, 300, 100)]
        expected.append(("done", t))
    assert rec.events == expected


def test_a_writer_error_reaches_the_caller_once_and_nothing_after_it_is_journaled():
    rec = Recorder(fail_at=4)   # the second tensor's first write fails
    out = Output(rec.write, rec.done, threaded=True, device=torch.device("cpu"))
    with pytest.raises(OSError, match="Input/output error"):
        _feed(out)
        out.close()
    out.close()                 # raised once: closing again is quiet
    assert rec.events[-1] == ("done", "a") and len(rec.events) == 4


@pytest.mark.parametrize("method", ["ties", "dare_ties", "model_stock"])
def test_threaded_output_writes_the_same_bytes(wide_family, tmp_path, monkeypatch, method):
    p = wide_family["paths"]

    def merge(name):
        return mbmerge.merge(method, base=str(p["base"]), experts=[str(p["e0"]), str(p["e1"])],
                             out=tmp_path / name, progress=False, memory_budget="100KB", device="cpu")
    threaded = read_model(merge("threaded"))       # the default
    real = Output.__init__
    monkeypatch.setattr(Output, "__init__", lambda self, w, d, *, threaded, device: real(self, w, d, threaded=False,
                                                                                      device=device))
    sync = read_model(merge("sync"))
    assert sync.keys() == threaded.keys()
    assert all(torch.equal(sync[k], threaded[k]) for k in sync)
    card = json.loads((tmp_path / "threaded" / "mbmerge.json").read_text())
    assert card["device"] == "cpu" and "peak_gpu_bytes" not in card


def test_nonfinite_input_named_after_the_last_chunk_is_read(wide_family, tmp_path, run_main):
    """The finite check runs once per tensor (one device sync), after its last chunk: still before
    anything is published, naming the input, file and tensor."""
    import shutil
    from safetensors.torch import load_file, save_file
    p = wide_family["paths"]
    bad = tmp_path / "bad"
    shutil.copytree(p["e1"], bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[-1] = float("nan")       # in the tensor's last chunk
    save_file(tensors, shard, metadata={"format": "pt"})
    code, _, err = run_main("--method", "ties", "--base", p["base"], "--experts", f"{p['e0']},{bad}",
                            "--out", tmp_path / "out", "--memory-budget", "100KB", "-q")
    assert code == 2 and f"tensor {name} holds NaN or Inf" in err and str(shard) in err
    assert not (tmp_path / "out").exists()


def test_chunks_travel_through_pinned_buffers_in_pieces_that_fit_one():
    from mbmerge.engine.device import SLOT_BYTES, _pieces
    per_slot = SLOT_BYTES // 2                                  # bf16 elements in one buffer
    assert _pieces(2 * per_slot + 3, 2) == [(0, per_slot), (per_slot, 2 * per_slot), (2 * per_slot, 2 * per_slot + 3)]
    assert _pieces(5, 1) == [(0, 5)] and _pieces(0, 4) == []
