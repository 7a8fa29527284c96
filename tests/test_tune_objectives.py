"""`mbmerge tune --objective np,forgetting`: a multi-objective study whose Pareto front, best within
--max-forgetting, halving and custom task objectives are checked against references written here. Each
trial's task-arithmetic merge is recomputed in plain torch and scored by a weight proxy: a domain's score is
the closeness to its expert, the general tasks' the closeness to the base (so forgetting is the relative loss
of closeness to the base); the proxy is patched in where the eval layer is called."""
import math

import pytest
import torch

import mbmerge
from mbmerge.eval import harness
from mbmerge.tune.objectives import parse, pareto_ranks
from mbmerge.tune.score import Candidate, Validation
from mbmerge.tune.search import Search, tune
from mbmerge.tune.space import parse_grid
from test_tune import DOMAINS, _weights

EMBEDDINGS = ("embed_tokens", "lm_head")
GRID = "weights=0.2:1.2 scale=0.3:1.5"


def _closeness(w: dict, ref: dict) -> float:
    return 1 / (1 + 1000 * sum((w[k] - ref[k]).square().mean() for k in w).item() / len(w))


@pytest.fixture
def setup(micro_zoo, monkeypatch):
    refs = {**{d: _weights(micro_zoo / d) for d in DOMAINS}, "general": _weights(micro_zoo / "base")}

    def evaluate_ranges(folder, requests, **kw):
        w = _weights(folder)
        return [_closeness(w, refs[t.name.removeprefix("mbmerge_zoo_")]) for t, _, _ in requests]
    monkeypatch.setattr(harness, "evaluate_ranges", evaluate_ranges)
    return micro_zoo, refs, dict(experts=tuple(str(micro_zoo / d) for d in DOMAINS), base=str(micro_zoo / "base"))


def _tune(kw, out, **search):
    return tune(Candidate(method="task_arithmetic", **kw), out=out, validation=Validation(tuple(DOMAINS), limit=4),
                search=Search(grid=parse_grid(GRID), sampler="tpe", per_expert=("weights",), **search))


def _merged(refs: dict, params: dict) -> dict:
    """Task arithmetic under MergeBench's protocol in plain torch: b + lam sum_i w_i (x_i - b), the
    embeddings and head kept at the base."""
    base = refs["general"]
    return {k: b if any(e in k for e in EMBEDDINGS) else
            b + params["scale"] * sum(w * (refs[d][k] - b) for w, d in zip(params["weights"], DOMAINS))
            for k, b in base.items()}


def _values(refs: dict, params: dict) -> tuple[float, float]:
    """(NP, forgetting) of a trial's merge, from the proxy's definitions."""
    w = _merged(refs, params)
    np_ = sum(_closeness(w, refs[d]) / _closeness(refs[d], refs[d]) for d in DOMAINS) / len(DOMAINS)
    base_general = _closeness(refs["general"], refs["general"])
    return np_, (base_general - _closeness(w, refs["general"])) / base_general


def _front(points: list[tuple[float, float]]) -> set[int]:
    """Brute force: the points no other point beats on NP (higher) and forgetting (lower) at once."""
    return {i for i, (n, f) in enumerate(points)
            if not any(n2 >= n and f2 <= f and (n2, f2) != (n, f) for n2, f2 in points)}


def test_pareto_ranks_peel_fronts_that_only_the_front_before_dominates():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        pts = torch.rand(25, 2, generator=g).mul(4).round().tolist()      # ties on purpose
        ranks = pareto_ranks(pts, ["maximize", "minimize"])
        beats = lambda a, b: a[0] >= b[0] and a[1] <= b[1] and a != b     # noqa: E731
        for i, p in enumerate(pts):
            assert not any(beats(pts[j], p) for j in range(len(pts)) if ranks[j] >= ranks[i])
            assert ranks[i] == 0 or any(beats(pts[j], p) for j in range(len(pts)) if ranks[j] == ranks[i] - 1)


def test_np_and_forgetting_give_the_front_and_the_best_within_the_forgetting_budget(setup, tmp_path):
    zoo, refs, kw = setup
    free = _tune(kw, tmp_path / "free", objective="np,forgetting", trials=8)
    done = [r for r in free["trials"] if r["state"] == "complete"]
    assert len(done) == 8 and free["objectives"] == ["np", "forgetting"]
    points = [_values(refs, r["params"]) for r in done]
    for r, (n, f) in zip(done, points):
        assert r["values"]["np"] == pytest.approx(n, rel=1e-5) and r["values"]["forgetting"] == pytest.approx(f, abs=1e-6)
    assert set(free["front"]) == {done[i]["number"] for i in _front(points)}
    limit = sorted(f for _, f in points)[3]        # four trials within it
    record = _tune(kw, tmp_path / "capped", objective="np,forgetting", trials=8, max_forgetting=limit)
    assert [r["values"] for r in record["trials"]] == [r["values"] for r in free["trials"]]   # the same study
    within = [(n, r) for r, (n, f) in zip(done, points) if f <= limit]
    assert record["best"]["number"] == max(within, key=lambda x: x[0])[1]["number"]
    best = max(within, key=lambda x: x[0])[1]
    merged = _weights(tmp_path / "capped")
    want = _merged(refs, best["params"])
    assert all(merged[k].allclose(want[k], atol=1e-6) for k in want)
    with pytest.raises(mbmerge.MbmergeError, match="no completed trial forgets at most 1e-09"):
        _tune(kw, tmp_path / "none", objective="np,forgetting", trials=8, max_forgetting=1e-9)


def test_the_command_prints_the_front_and_plots_it(setup, tmp_path, run_main):
    zoo, refs, kw = setup
    args = ["tune", "--method", "task_arithmetic", "--experts", ",".join(kw["experts"]), "--base", kw["base"],
            "--validate", ",".join(DOMAINS), "--sampler", "nsga2", "--trials", "4", "--grid", GRID, "--limit", "4",
            "--objective", "np,forgetting", "--max-forgetting", "0.5", "--out", tmp_path / "best"]
    code, out, err = run_main(*args)
    assert code == 0, err
    assert "| NP | forgetting | examples |" in out and "Pareto front (np, forgetting): trial " in out
    assert "best: the best np among those forgetting at most 0.5" in out
    assert (tmp_path / "best" / "tune-front.png").stat().st_size > 5000 and "tune-front.png" in out
    code, shown, err = run_main(*args, "--show")
    assert code == 0, err
    assert "Pareto front (np, forgetting): trial " in shown and "the Pareto front: " in shown


def test_halving_keeps_the_best_third_by_pareto_front_then_np(setup, tmp_path):
    zoo, refs, kw = setup
    record = _tune(kw, tmp_path / "best", objective="np,forgetting", trials=9, prune="halving")
    rows = record["trials"]
    assert len(rows) == 9
    points = [_values(refs, r["params"]) for r in rows]       # the proxy does not vary with the examples
    ranks = pareto_ranks([list(p) for p in points], ["maximize", "minimize"])
    order = sorted(range(9), key=lambda i: (ranks[i], -points[i][0]))
    assert {rows[i]["number"] for i in order[:3]} == {r["number"] for r in rows if r["rung"] >= 1}
    assert sum(r["state"] == "pruned" for r in rows) == 8 and sum(r["state"] == "complete" for r in rows) == 1
    kept = order[:3]
    kept_ranks = pareto_ranks([list(points[i]) for i in kept], ["maximize", "minimize"])
    last = kept[min(range(3), key=lambda j: (kept_ranks[j], -points[kept[j]][0]))]
    assert record["best"]["number"] == rows[last]["number"]


def test_a_task_list_is_an_objective_of_its_mean_score(setup, tmp_path):
    zoo, refs, kw = setup
    record = _tune(kw, tmp_path / "best", objective="np,mbmerge_zoo_general:score", trials=3)
    for r in record["trials"]:
        w = _merged(refs, r["params"])
        assert r["values"]["mbmerge_zoo_general:score"] == pytest.approx(_closeness(w, refs["general"]), rel=1e-5)


def test_objective_refusals_are_one_line_and_write_nothing(setup, tmp_path):
    zoo, refs, kw = setup
    cases = [(dict(objective="np,np"), "np is given twice"), (dict(objective="np,,forgetting"), "an empty objective"),
             (dict(objective="np", max_forgetting=0.1), "--max-forgetting needs forgetting"),
             (dict(objective="np,forgetting", sampler="cmaes"), "for several use tpe or nsga2")]
    for extra, words in cases:
        with pytest.raises(mbmerge.MbmergeError) as e:
            tune(Candidate(method="task_arithmetic", **kw), out=tmp_path / "x",
                 validation=Validation(tuple(DOMAINS), limit=4),
                 search=Search(grid=parse_grid(GRID), **{"sampler": "tpe", **extra}))
        assert words in str(e.value) and "\n" not in str(e.value), (extra, str(e.value))
    with pytest.raises(mbmerge.MbmergeError, match="no validation split of its general tasks"):
        tune(Candidate(method="task_arithmetic", **kw), out=tmp_path / "x",
             validation=Validation(("math", "multilingual"), family="gemma-2-2b", limit=4),
             search=Search(grid=parse_grid(GRID), sampler="tpe", objective="np,forgetting"))
    assert not (tmp_path / "x").exists()
    assert [o.direction for o in parse("np,forgetting,arc_easy:acc_norm")] == ["maximize", "minimize", "maximize"]
    assert math.isclose(parse("forgetting")[0].told(None), 1.0)
