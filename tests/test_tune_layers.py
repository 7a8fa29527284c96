"""`mbmerge tune --per-layer G`: one value per (group of layers, expert), each trial a mergekit recipe of G
slices. The best merge is checked against task arithmetic written here per layer group; its recipe, beside
it, is an ordinary mergekit recipe whose card command rewrites the very same bytes. Scores come from the
weight proxy of test_tune (the micro zoo's experts score 0 on their tasks)."""
import json
import shlex
from pathlib import Path

import pytest
import yaml

import mbmerge
from mbmerge.eval import harness
from mbmerge.tune.layers import layer_groups
from mbmerge.tune.score import Candidate, Validation
from mbmerge.tune.search import Search, tune
from mbmerge.tune.space import parse_grid
from test_tune import DOMAINS, _proxy, _weights

EMBEDDINGS = ("embed_tokens", "lm_head")


@pytest.fixture
def setup(micro_zoo, monkeypatch):
    monkeypatch.setattr(harness, "evaluate_ranges", _proxy(micro_zoo, wobble=0.3))
    return micro_zoo, dict(experts=tuple(str(micro_zoo / d) for d in DOMAINS), base=str(micro_zoo / "base"))


def _tune(kw, out, grid, **search):
    return tune(Candidate(method="task_arithmetic", **kw), out=out, validation=Validation(tuple(DOMAINS), limit=4),
                search=Search(grid=parse_grid(grid), sampler="tpe", **search))


def test_groups_cut_the_layers_evenly_and_in_order():
    for n in range(1, 30):
        for g in range(1, n + 1):
            groups = layer_groups(n, g)
            sizes = [end - first for first, end in groups]
            assert groups[0][0] == 0 and groups[-1][1] == n and len(groups) == g
            assert all(a[1] == b[0] for a, b in zip(groups, groups[1:])) and max(sizes) - min(sizes) <= 1
    assert layer_groups(10, 3) == [(0, 3), (3, 7), (7, 10)]


def _reference(zoo, params: dict, n_layers: int) -> dict:
    """Task arithmetic per group of layers, in plain torch: layer tensors of group g get b + lam_g sum_i
    w_ig (x_i - b); the embeddings and head stay the base's (MergeBench's protocol); the other tensors outside
    the layers (the final norm) take the last group's values, as mergekit plans them."""
    base, experts = _weights(zoo / "base"), [_weights(zoo / d) for d in DOMAINS]
    groups = layer_groups(n_layers, len(params["scale"]))
    out = {}
    for name, b in base.items():
        if any(e in name for e in EMBEDDINGS):
            out[name] = b
            continue
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        g = len(groups) - 1 if layer is None else next(k for k, (lo, hi) in enumerate(groups) if lo <= layer < hi)
        lam, w = params["scale"][g], params["weights"][g]
        out[name] = b + lam * sum(w[i] * (x[name] - b) for i, x in enumerate(experts))
    return out


def test_the_best_per_layer_recipe_is_task_arithmetic_per_group_and_its_command_rewrites_it(setup, tmp_path,
                                                                                              run_main):
    zoo, kw = setup
    record = _tune(kw, tmp_path / "best", "weights=0.2:1.0 scale=0.3:1.0", trials=5, per_expert=("weights",),
                   per_layer=2)
    assert record["per_layer"] == 2 and len(record["trials"]) == 5
    for r in record["trials"]:
        w, lam = r["params"]["weights"], r["params"]["scale"]
        assert len(w) == 2 and all(len(x) == 2 and all(0.2 <= y <= 1.0 for y in x) for x in w)
        assert len(lam) == 2 and all(0.3 <= y <= 1.0 for y in lam)
    assert len({str(r["params"]) for r in record["trials"]}) == 5
    best = max(record["trials"], key=lambda r: r["np"])
    assert record["best"]["number"] == best["number"]

    merged = _weights(tmp_path / "best")
    want = _reference(zoo, best["params"], n_layers=2)
    assert set(merged) == set(want)
    for name in want:
        assert merged[name].allclose(want[name], atol=1e-6), name
    # the output's own, separately scored: the proxy of the written merge is the best trial's NP
    assert best["np"] == pytest.approx(_np(zoo, tmp_path / "best"), rel=1e-6)

    recipe = yaml.safe_load((tmp_path / "best" / "mbmerge_config.yml").read_text())
    assert recipe["merge_method"] == "task_arithmetic" and len(recipe["slices"]) == 2
    for g, s in enumerate(recipe["slices"]):
        assert [src["layer_range"] for src in s["sources"]] == [[g, g + 1]] * 3
        assert [src["parameters"]["weight"] for src in s["sources"][1:]] == best["params"]["weights"][g]
        assert s["parameters"]["lambda"] == best["params"]["scale"][g]
    command = json.loads((tmp_path / "best" / "mbmerge.json").read_text())["command"]
    args = shlex.split(command)
    assert args[:3] == ["mbmerge", "--config", str(tmp_path / "best" / "mbmerge_config.yml")]
    again = tmp_path / "again"
    code, _, err = run_main(*args[1:args.index("--out")], "--out", again)
    assert code == 0, err
    assert (again / "model.safetensors").read_bytes() == (tmp_path / "best" / "model.safetensors").read_bytes()


def _np(zoo, folder: Path) -> float:
    score = _proxy(zoo, wobble=0.3).score
    mean = {}
    for d in DOMAINS:
        mean[d] = score(str(folder), d, 0, 4)
    experts = {d: score(str(zoo / d), d, 0, 4) for d in DOMAINS}
    return sum(mean[d] / experts[d] for d in DOMAINS) / len(DOMAINS)


def test_per_layer_refusals_are_one_line_and_write_nothing(setup, tmp_path):
    zoo, kw = setup
    cases = [(dict(grid="weights=0.2,0.4", sampler="grid", per_layer=2), "--per-layer"),
             (dict(grid="weights=0.2:1.0", per_layer=3), "the models have 2 layer(s)"),
             (dict(grid="weights=0.2:1.0", per_layer=0), "at least 1 group")]
    for extra, words in cases:
        grid = parse_grid(extra.pop("grid"))
        with pytest.raises(mbmerge.MbmergeError) as e:
            tune(Candidate(method="task_arithmetic", **kw), out=tmp_path / "x",
                 validation=Validation(tuple(DOMAINS), limit=4),
                 search=Search(grid=grid, **{"sampler": "tpe", **extra}))
        assert words in str(e.value) and "\n" not in str(e.value), (extra, str(e.value))
    with pytest.raises(mbmerge.MbmergeError, match="mergekit has no iso_c"):
        tune(Candidate(method="iso_c", **kw), out=tmp_path / "x", validation=Validation(tuple(DOMAINS), limit=4),
             search=Search(grid=parse_grid("scale=0.5:1.5"), sampler="tpe", per_layer=2))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("per_layer", [1, 2])
def test_a_calibrated_search_writes_the_step_into_the_best_merge_and_its_recipe(setup, tmp_path, run_main, per_layer):
    zoo, kw = setup
    code, out, err = run_main("tune", "--method", "task_arithmetic", "--experts", ",".join(kw["experts"]), "--base",
                              kw["base"], "--validate", ",".join(DOMAINS), "--sampler", "tpe", "--trials", "2",
                              "--grid", "scale=0.3:1.0", "--per-layer", per_layer, "--calibrate", "svc",
                              "--svc-alpha", "0.2", "--limit", "4", "--out", tmp_path / "best")
    assert code == 0, err
    card = json.loads((tmp_path / "best" / "mbmerge.json").read_text())
    assert card["params"]["svc_alpha"] == 0.2
    if per_layer == 1:
        assert "--calibrate svc" in card["command"] and "--svc-alpha 0.2" in card["command"]
        return
    recipe = yaml.safe_load((tmp_path / "best" / "mbmerge_config.yml").read_text())
    assert recipe["calibrate"] == {"method": "svc", "alpha": 0.2}
    args = shlex.split(card["command"])
    code, _, err = run_main(*args[1:args.index("--out")], "--out", tmp_path / "again")
    assert code == 0, err
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "best" / "model.safetensors").read_bytes()
