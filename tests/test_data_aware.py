"""The data-aware methods (fisher, regmean, localize_stitch_trained) against dense references
written here, their statistics streamed by the engine, and what bad statistics folders get."""
import json

import pytest
import torch

import mbmerge
from mbmerge.methods import merge_tensors
from conftest import read_model, write_stats


def _experts(n=3, shape=(12, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    return b, [b + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def _gram(n_in, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n_in, rank or n_in, generator=g) @ torch.randn(rank or n_in, n_in, generator=g)
    return x.T @ x / x.shape[0]


# --- fisher ---------------------------------------------------------------------------------------


def test_fisher_is_the_fisher_weighted_average_of_the_experts():
    b, xs = _experts()
    fs = [torch.rand(b.shape) for _ in xs]
    fs[0][0, :3] = 0                                               # the floor keeps 0/0 away
    w = [0.5, 1.0, 2.0]
    got = merge_tensors("fisher", None, xs, stat=fs, weights=w)
    f = [torch.clamp(fi, min=1e-10).double() for fi in fs]
    want = sum(wi * fi * x.double() for wi, fi, x in zip(w, f, xs)) / sum(wi * fi for wi, fi in zip(w, f))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_fisher_with_equal_fishers_is_the_weighted_average():
    b, xs = _experts()
    got = merge_tensors("fisher", None, xs, stat=[torch.ones(b.shape)] * 3, weights=[1.0, 1.0, 2.0])
    torch.testing.assert_close(got, (xs[0] + xs[1] + 2 * xs[2]) / 4)


# --- regmean --------------------------------------------------------------------------------------


def _regmean_dense(xs, grams, alpha, pinv=False):
    """W^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T, G~ = G with off-diagonals times alpha, in float64."""
    gs = [g.double() * alpha + torch.diag(torch.diag(g.double())) * (1 - alpha) for g in grams]
    a, rhs = sum(gs), sum(g @ x.double().T for g, x in zip(gs, xs))
    return ((torch.linalg.pinv(a) @ rhs) if pinv else torch.linalg.solve(a, rhs)).T


@pytest.mark.parametrize("alpha", [0.5, 0.1, 1.0])
def test_regmean_solves_the_closed_form(alpha):
    b, xs = _experts()
    grams = [_gram(8, seed=i) for i in range(3)]
    got = merge_tensors("regmean", None, xs, stat=grams, reduction=alpha)
    torch.testing.assert_close(got.double(), _regmean_dense(xs, grams, alpha), rtol=1e-5, atol=1e-6)


def test_regmean_with_equal_grams_is_the_average():
    b, xs = _experts()
    g = _gram(8)
    got = merge_tensors("regmean", None, xs, stat=[g, g, g], reduction=0.5)
    torch.testing.assert_close(got, sum(xs) / 3, rtol=1e-5, atol=1e-6)


def test_regmean_falls_back_to_the_pseudo_inverse_on_singular_grams():
    b, xs = _experts()
    grams = [_gram(8, rank=3, seed=i) for i in range(2)]           # sum of rank 3 + 3 < 8: singular
    got = merge_tensors("regmean", None, xs[:2], stat=grams, reduction=1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _regmean_dense(xs[:2], grams, 1.0, pinv=True), rtol=1e-4, atol=1e-5)


def test_regmean_averages_tensors_without_grams():
    b, xs = _experts(shape=(8,))
    torch.testing.assert_close(merge_tensors("regmean", None, xs, stat=[None] * 3), sum(xs) / 3)


# --- trained localize-and-stitch -----------------------------------------------------------------


def test_localize_stitch_trained_stitches_the_given_masks_averaging_overlaps():
    b, xs = _experts()
    g = torch.Generator().manual_seed(3)
    masks = [(torch.rand(b.shape, generator=g) < 0.4).to(torch.uint8) for _ in xs]
    got = merge_tensors("localize_stitch_trained", b, xs, stat=masks)
    want = b.clone()
    for idx in range(b.numel()):
        picked = [x.flatten()[idx] - b.flatten()[idx] for x, m in zip(xs, masks) if m.flatten()[idx]]
        want.view(-1)[idx] += sum(picked) / len(picked) if picked else 0
    torch.testing.assert_close(got, want)


# --- streamed: the engine reads the statistics beside the weights ----------------------------------


@pytest.mark.parametrize("method", ["fisher", "regmean", "localize_stitch_trained"])
def test_streamed_merge_equals_the_in_memory_merge_in_row_chunks(wide_family, tmp_path, method):
    """4096-element chunks: [96, 200] in 20-row pieces, Grams [200, 200] applied per row block."""
    kind = mbmerge.methods.get(method).data_statistic.kind
    p, names = wide_family["paths"], ["e0", "e1", "e2"]
    out = mbmerge.merge(method, base=str(p["base"]), experts=[str(p[e]) for e in names], out=tmp_path / "out",
                        stats_folders=[wide_family["stats"][kind][e][0] for e in names], memory_budget="100KB",
                        keep_base="", progress=False)
    t = wide_family["tensors"]
    want = mbmerge.methods.merge_state_dicts(method, {k: v.bfloat16() for k, v in t["base"].items()},
                                             [{k: v.bfloat16() for k, v in t[e].items()} for e in names],
                                             stat=[wide_family["stats"][kind][e][1] for e in names], keep_base="")
    got = read_model(out)
    assert json.loads((out / "mbmerge.json").read_text())["chunk_elements"] == 4096
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _bad(family, tmp_path, method="fisher", **kw):
    p = family["paths"]
    kw.setdefault("stats_folders", [str(family["stats"]["fisher"][e][0]) for e in ("math", "code")])
    return mbmerge.merge(method, base=str(p["base"]), experts=[str(p["math"]), str(p["code"])],
                         out=tmp_path / "out", progress=False, **kw)


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_a_missing_statistic_names_the_folder_and_tensor(family, tmp_path):
    stats = dict(family["stats"]["fisher"]["code"][1])
    del stats["model.layers.1.mlp.up_proj.weight"]
    folder = write_stats(tmp_path / "partial", "fisher", stats)
    with pytest.raises(mbmerge.MbmergeError) as e:
        _bad(family, tmp_path, stats_folders=[str(family["stats"]["fisher"]["math"][0]), str(folder)])
    _one_line(e, str(folder), "model.layers.1.mlp.up_proj.weight")
    assert not (tmp_path / "out").exists()


def test_a_statistic_of_the_wrong_shape_names_the_file_and_tensor(family, tmp_path):
    stats = dict(family["stats"]["fisher"]["code"][1])
    stats["model.norm.weight"] = torch.ones(7)
    folder = write_stats(tmp_path / "bad", "fisher", stats)
    with pytest.raises(mbmerge.MbmergeError) as e:
        _bad(family, tmp_path, stats_folders=[str(family["stats"]["fisher"]["math"][0]), str(folder)])
    _one_line(e, "model.safetensors", "model.norm.weight", "[7]")
    assert not (tmp_path / "out").exists()


def test_statistics_of_another_kind_or_count_are_refused(family, tmp_path):
    with pytest.raises(mbmerge.MbmergeError) as e:
        _bad(family, tmp_path, stats_folders=[str(family["stats"]["gram"][x][0]) for x in ("math", "code")])
    _one_line(e, "gram", "fisher")
    with pytest.raises(mbmerge.MbmergeError) as e:
        _bad(family, tmp_path, stats_folders=[str(family["stats"]["fisher"]["math"][0])])
    _one_line(e, "1 statistics folder", "2 experts")
    with pytest.raises(mbmerge.MbmergeError) as e:
        _bad(family, tmp_path, stats_folders=[str(tmp_path / "none")] * 2)
    _one_line(e, "mbmerge-stats.json")


def test_grams_some_experts_lack_are_refused(family, tmp_path):
    stats = dict(family["stats"]["gram"]["code"][1])
    del stats["model.layers.0.self_attn.q_proj.weight"]
    folder = write_stats(tmp_path / "partial", "gram", stats)
    with pytest.raises(mbmerge.MbmergeError) as e:
        _bad(family, tmp_path, "regmean", stats_folders=[str(family["stats"]["gram"]["math"][0]), str(folder)])
    _one_line(e, str(folder), "q_proj")


def test_statistics_are_required_and_only_for_data_aware_methods(family, tmp_path):
    with pytest.raises(mbmerge.MbmergeError) as e:
        _bad(family, tmp_path, stats_folders=None)
    _one_line(e, "--stats", "--data")
    with pytest.raises(mbmerge.MbmergeError) as e:
        _bad(family, tmp_path, "ties")
    _one_line(e, "ties", "fisher")


def test_the_command_line_refuses_bad_statistics_in_one_line(family, tmp_path, run_main):
    p = family["paths"]
    code, out, err = run_main("--method", "regmean", "--base", p["base"], "--experts", f"{p['math']},{p['code']}",
                              "--stats", f"{family['stats']['fisher']['math'][0]},{family['stats']['fisher']['code'][0]}",
                              "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and "needs gram" in err
    assert not (tmp_path / "out").exists()

