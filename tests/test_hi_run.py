"""Hi-Merging on model folders: each Mix is the streamed TIES merge it names (checked against the
library tensor by tensor), and the whole search runs on the micro zoo through the tuning cache."""
import json

import pytest
import torch

import mbmerge
from mbmerge.methods import merge_tensors
from mbmerge.eval import harness
from mbmerge.tune.hi_merging import HiSearch, Mix
from mbmerge.tune.hi_run import candidate, hi_merge, hi_search, n_layers
from mbmerge.tune.score import Validation
from conftest import read_model
from test_tune import DOMAINS, _proxy

TIES_SUM = dict(aggregate="sum", consensus="sum", scale=1.0)


def _want(t, name, experts, p, s):
    return merge_tensors("ties", t["base"][name].bfloat16(), [t[e][name].bfloat16() for e in experts], key=name,
                         density=p, weights=s, keep_ties=True, **TIES_SUM)


@pytest.mark.parametrize("mix", [Mix(experts=(0, 1), p=(0.3, 0.5), s=(0.8, 0.6)),
                                 Mix(experts=(0, 1), p=(0.3, 0.5), s=(0.8, 0.6), layers=((1, 1, 0.15, 0.3),)),
                                 Mix(experts=(0, 1), p=(0.3, 0.5), s=(0.8, 0.6), only_layer=0),
                                 Mix(experts=(1,), p=(0.4,), s=(0.9,), drop_layer=1)])
def test_a_mix_is_the_ties_merge_it_names(family, tmp_path, mix):
    names, t = ["math", "code"], family["tensors"]
    c = candidate(mix, [str(family["paths"][e]) for e in names], str(family["paths"]["base"]), 2)
    from mbmerge.engine.api import run
    got = read_model(run(c.spec(tmp_path / "m")))
    for name, b in t["base"].items():
        layer = 0 if "layers.0." in name else 1 if "layers.1." in name else None
        p, s = list(mix.p), list(mix.s)
        for l, e, lp, ls in mix.layers:
            if l == layer:
                p[mix.experts.index(e)], s[mix.experts.index(e)] = lp, ls
        at_base = "embed" in name or "lm_head" in name or (layer is not None and layer == mix.drop_layer) or \
            (mix.only_layer is not None and layer != mix.only_layer)
        want = b.bfloat16() if at_base else _want(t, name, [names[e] for e in mix.experts], p, s)
        assert torch.equal(got[name], want), name


def test_hi_merge_runs_on_the_zoo_within_its_budget_and_a_rerun_merges_nothing(micro_zoo, tmp_path, monkeypatch):
    calls = []
    proxy = _proxy(micro_zoo)
    monkeypatch.setattr(harness, "evaluate_ranges", lambda f, *a, **k: calls.append(f) or proxy(f, *a, **k))
    kw = dict(experts=[str(micro_zoo / d) for d in DOMAINS], base=str(micro_zoo / "base"),
              validation=Validation(tuple(DOMAINS)),
              search=HiSearch(grid_p=(0.5, 1.0), grid_s=(0.5, 1.0), max_evals=30))
    record = hi_merge(out=tmp_path / "hi", **kw)
    assert n_layers(micro_zoo / "base") == 2 and record["evals"] <= 30
    assert record["stage1"]["p"] in (0.5, 1.0) and record["np_final"] >= record["stage1"]["np"]
    saved = json.loads((tmp_path / "hi" / "tune.json").read_text())
    assert saved["decisions"] == record["decisions"] and (tmp_path / "hi" / "model.safetensors").exists()
    assert record["seconds"]["merge"] > 0 and record["seconds"]["validation"] > 0
    merged = [c for c in calls if "mbmerge-tune-" in str(c)]
    again = hi_merge(out=tmp_path / "hi2", **kw)
    assert [c for c in calls if "mbmerge-tune-" in str(c)] == merged and again["np_final"] == record["np_final"]


def test_hi_merge_refuses_a_grid_it_does_not_have():
    with pytest.raises(mbmerge.MbmergeError, match="p and s"):
        hi_search(grid={"density": [0.1]})
