"""`mbmerge tune` on the micro zoo: it picks what a brute-force loop written here picks, a rerun
scores nothing, and the real lm-eval path (serial and in worker processes) gives a usable record.

The micro zoo's experts score 0 on their tasks, so the selection tests score a merge by a proxy
of its weights instead (closeness to each domain's expert), patched in where the eval layer is
called; the brute force computes the same proxy on merges it makes itself."""
import json

import pytest
import torch
from safetensors.torch import load_file

import mbmerge
from mbmerge.tune import score as scoring
from mbmerge.tune.search import parse_grid, tune

DOMAINS = ["math", "coding"]


def _weights(folder):
    return {k: v.float() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _proxy(zoo):
    """A merge's 'score' on domain d: 1 / (1 + 1000 * mean squared distance to d's expert)."""
    experts = {d: _weights(zoo / d) for d in DOMAINS}

    def scores(folder, v, domains, cache=False):
        w = _weights(folder)
        return {d: 1 / (1 + 1000 * sum((w[k] - experts[d][k]).square().mean() for k in w).item() / len(w))
                for d in domains}
    return scores


@pytest.fixture
def setup(micro_zoo, monkeypatch):
    calls = []
    proxy = _proxy(micro_zoo)
    monkeypatch.setattr(scoring, "validation_scores", lambda *a, **k: calls.append(a[0]) or proxy(*a, **k))
    kw = dict(experts=[str(micro_zoo / d) for d in DOMAINS], base=str(micro_zoo / "base"), validate=DOMAINS)
    return micro_zoo, kw, proxy, calls


def test_tune_picks_the_candidate_a_brute_force_loop_picks(setup, tmp_path):
    zoo, kw, proxy, _ = setup
    grid = {"density": [0.1, 0.3, 1.0], "scale": [0.2, 0.6, 1.0]}
    record = tune("ties", out=tmp_path / "best", grid=grid, **kw)
    brute = {}
    for density in grid["density"]:
        for scale in grid["scale"]:
            out = mbmerge.merge("ties", out=tmp_path / f"bf-{density}-{scale}", protocol="mergebench",
                                progress=False, density=density, scale=scale, **{k: kw[k] for k in ("experts", "base")})
            s = proxy(out, None, DOMAINS)
            brute[(density, scale)] = sum(s[d] / 1.0 for d in DOMAINS) / 2     # an expert's proxy score is 1
    best = max(brute, key=brute.get)
    assert (record["best"]["params"]["density"], record["best"]["params"]["scale"]) == best
    for row in record["candidates"]:
        assert row["np"] == pytest.approx(brute[(row["params"]["density"], row["params"]["scale"])], rel=1e-6)
    card = json.loads((tmp_path / "best" / "mbmerge.json").read_text())
    assert card["params"]["density"] == [best[0]] * 2 and card["params"]["scale"] == best[1]
    assert json.loads((tmp_path / "best" / "tune.json").read_text())["best"] == record["best"]


def test_a_rerun_scores_nothing_and_other_settings_score_again(setup, tmp_path):
    zoo, kw, _, calls = setup
    grid = {"scale": [0.4, 0.8]}
    merges = lambda: [c for c in calls if str(c) not in kw["experts"]]  # noqa: E731 (not the experts' references)
    first = tune("task_arithmetic", out=tmp_path / "a", grid=grid, **kw)
    n = len(merges())
    again = tune("task_arithmetic", out=tmp_path / "b", grid=grid, **kw)
    assert n == 2 and len(merges()) == n and again["evaluated"] == 0 and again["cached"] == 2
    assert [r["np"] for r in again["candidates"]] == [r["np"] for r in first["candidates"]]
    other = tune("task_arithmetic", out=tmp_path / "c", grid=grid, limit=3, **kw)
    assert other["evaluated"] == 2


def test_grid_errors_are_one_line(setup, tmp_path):
    zoo, kw, _, _ = setup
    for bad, words in [({"densty": [0.1]}, "densty"), ({"density": [2.0]}, "(0, 1]")]:
        with pytest.raises(mbmerge.MbmergeError) as e:
            tune("ties", out=tmp_path / "x", grid=bad, **kw)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(mbmerge.MbmergeError, match="no default grid for slerp"):
        tune("slerp", out=tmp_path / "x", **{**kw, "experts": kw["experts"][:1], "validate": DOMAINS[:1]})
    with pytest.raises(mbmerge.MbmergeError, match="name=v1,v2"):
        parse_grid("scale")
    assert parse_grid("scale=0.2,0.4 tall-lambda=0.3") == {"scale": ["0.2", "0.4"], "tall_lambda": ["0.3"]}
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("jobs", [1, 2])
def test_tune_through_lm_eval_on_the_validation_split(micro_zoo, tmp_path, run_main, jobs):
    """The real scorer: the zoo's validation tasks through lm-eval, serially or in 2 processes."""
    code, out, err = run_main("tune", "--method", "task_arithmetic", "--experts", f"{micro_zoo / 'math'},"
                              f"{micro_zoo / 'coding'}", "--base", micro_zoo / "base", "--validate", "math,coding",
                              "--grid", "scale=0.5,1.0", "--limit", "4", "--jobs", jobs, "--out", tmp_path / "best")
    assert code == 0, err
    record = json.loads((tmp_path / "best" / "tune.json").read_text())
    assert record["evaluated"] == 2 and record["seconds"]["validation"] > 0 and record["seconds"]["merge"] > 0
    assert all(set(r["scores"]) == {"math", "coding"} for r in record["candidates"])
    assert all(isinstance(r["scores"]["math"], float) for r in record["candidates"])
    assert "merge (algorithm) time" in out and (tmp_path / "best" / "model.safetensors").exists()


def test_the_cache_key_names_files_not_spellings(micro_zoo, monkeypatch):
    """Domain names, folders and a trailing slash naming the same files give the same key; another
    parameter or input does not."""
    from mbmerge.tune.score import Candidate, Validation, keys

    def identity(c, v, domain):
        return keys(c, v, [domain])[domain]
    monkeypatch.setenv("MBMERGE_CACHE", str(micro_zoo.parents[1]))     # domain names -> this zoo
    v = Validation(tuple(DOMAINS))
    by_name = Candidate(method="ties", experts=tuple(DOMAINS), params={"density": 0.2})
    by_folder = Candidate(method="ties", experts=tuple(f"{micro_zoo / d}/" for d in DOMAINS),
                          base=str(micro_zoo / "base"), params={"density": 0.2})
    assert identity(by_name, v, "math") == identity(by_folder, v, "math")
    assert identity(by_name, v, "math") != identity(by_name, v, "coding")
    other = [Candidate(method="ties", experts=tuple(DOMAINS), params={"density": 0.3}),
             Candidate(method="ties", experts=("math", "safety"), params={"density": 0.2})]
    assert all(identity(by_name, v, "math") != identity(c, v, "math") for c in other)
