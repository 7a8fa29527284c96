"""Parity with mergekit-tokensurgeon 0.1.5 on test_tokensurgeon's float32 models (a character-level Llama and a
byte-level BPE donor): for each implemented deterministic method, the same vocabulary and, compared by token
(not by id), the same row for every token; the other tensors and the config's vocab_size and special token ids
equal. mergekit runs as a subprocess: set MBMERGE_TOKENSURGEON=/path/to/mergekit-tokensurgeon, put it on PATH,
or beside MBMERGE_MERGEKIT; otherwise these tests are skipped.

Where mbmerge differs on purpose, the case says so: mergekit allows --prefix-match/--byte-match `embed` on the
head and `lm_head` on the embedding (its two calls swap them), so mbmerge's `embed` is compared with mergekit's
`lm_head`. subword's weighted_mean has no parity case: mergekit weighs an embedding's first piece most, against
its own comment and its first_last (test_tokensurgeon checks mbmerge's weights against a plain reference).
"""
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import read_model
from test_tokensurgeon import VOCAB, by_token, pair, transplant  # noqa: F401  (pair: the fixture)


def _tokensurgeon() -> str | None:
    beside = os.environ.get("MBMERGE_MERGEKIT")
    beside = Path(beside).parent / "mergekit-tokensurgeon" if beside else None
    return (os.environ.get("MBMERGE_TOKENSURGEON") or shutil.which("mergekit-tokensurgeon")
            or (str(beside) if beside and beside.is_file() else None))


TOKENSURGEON = _tokensurgeon()
pytestmark = pytest.mark.skipif(not TOKENSURGEON, reason="mergekit-tokensurgeon not found (set MBMERGE_TOKENSURGEON)")

# case: (model, donor, mergekit's arguments, mbmerge's options)
CASES = {
    "omp-matches": ("model", "donor", ["-k", "8", "-bm", "yes", "-pm", "lm_head"],
                    dict(k=8, byte_match="yes", prefix_match="embed")),
    "omp-tied-model-untied-donor": ("tied", "donor_untied", ["-k", "8"], dict(k=8)),
    "common_interpolation": ("model", "donor", ["-a", "common_interpolation", "-k", "8"],
                             dict(method="common_interpolation", k=8)),
    "barycentric-cosine": ("model", "donor_untied", ["-a", "common_interpolation", "-k", "8", "-w", "barycentric", "-c"],
                           dict(method="common_interpolation", k=8, weight_scheme="barycentric", cosine_similarity=True)),
    "least_squares": ("model", "donor", ["-a", "common_interpolation", "-k", "8", "-w", "least_squares"],
                      dict(method="common_interpolation", k=8, weight_scheme="least_squares")),
    "subword-mean": ("model", "donor", ["-a", "subword"], dict(method="subword")),
    "subword-first_last": ("model", "donor", ["-a", "subword", "-s", "first_last"],
                           dict(method="subword", subword_method="first_last")),
    "mean": ("model", "donor", ["-a", "mean"], dict(method="mean")),
    "zero": ("tied", "donor", ["-a", "zero"], dict(method="zero")),
}


@pytest.fixture(scope="module")
def mergekit(pair, tmp_path_factory):   # noqa: F811
    """mergekit-tokensurgeon's output of every case, two processes at a time."""
    root = tmp_path_factory.mktemp("mergekit-tokensurgeon")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(case: str) -> Path:
        model, donor, args, _ = CASES[case]
        out = root / case
        done = subprocess.run([TOKENSURGEON, str(pair["paths"][model]), str(pair["paths"][donor]), str(out), *args],
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return out

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


@pytest.mark.parametrize("case", CASES)
def test_rows_by_token_match_mergekit(pair, mergekit, tmp_path, case):   # noqa: F811
    model, donor, _, options = CASES[case]
    ours = transplant(pair, tmp_path / case, model=model, donor=donor, **options)
    theirs = mergekit[case]
    vocab, their_vocab = by_token(ours), by_token(theirs)
    assert vocab.keys() == their_vocab.keys()
    got, want = read_model(ours), read_model(theirs)
    assert got.keys() == want.keys()
    tokens = sorted(vocab)
    for name in got:
        if name not in VOCAB:
            assert torch.equal(got[name], want[name]), name
            continue
        a = got[name][[vocab[t] for t in tokens]]
        b = want[name][[their_vocab[t] for t in tokens]]
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (name, (a - b).abs().max().item())
    config, their_config = (json.loads((f / "config.json").read_text()) for f in (ours, theirs))
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert config.get(key) == their_config.get(key), key
