"""Hi-Merging's search against a fake scorer written here, whose scores are simple enough to work
out by hand; every expected number below is derived in its comment, not read off the code."""
from collections import Counter
from itertools import combinations

import pytest

from mbmerge.tune.hi_merging import HiSearch, Mix, hi_merging


class Fake:
    """score_d(mix) = B_d + z_d [experts present, no layer dropped or singled out]
                    + sum over the mix's layers l of ( sum_e w_el g[e][l][d] - sum_{e<f} w_el w_fl x[l][d] ),
    w_el = p * s of expert e at layer l (its override there, else its model-wise pair).
    x is the interference between experts at a layer; z makes removal and addition impacts differ."""

    def __init__(self, B, z, g, x):
        self.B, self.z, self.g, self.x = B, z, g, x
        self.calls = Counter()                                  # (mix, domain) -> times scored

    def __call__(self, mix, domains):
        self.calls.update((mix, d) for d in domains)
        return {d: self.value(mix, d) for d in domains}

    def value(self, mix, d):
        L = len(self.x)
        ps = {(e, l): (p, s) for e, p, s in zip(mix.experts, mix.p, mix.s) for l in range(L)}
        ps.update({(e, l): (p, s) for l, e, p, s in mix.layers})
        full = mix.experts and mix.only_layer is None and mix.drop_layer is None
        total = self.B[d] + (self.z[d] if full else 0.0)
        for l in ([mix.only_layer] if mix.only_layer is not None else range(L)):
            if l == mix.drop_layer:
                continue
            w = {e: ps[e, l][0] * ps[e, l][1] for e in mix.experts}
            total += sum(w[e] * self.g[e][l][d] for e in w)
            total -= sum(w[e] * w[f] for e, f in combinations(w, 2)) * self.x[l][d]
        return total


def two():
    """Experts 0 (domain a) and 1 (domain b), 3 layers. Alone at p = s = 1 they score
    a: 1.5 + 0.5 + (3 + 1 + 2) = 8 and b: 8.75 + 0.25 + (1 + 2 + 4) = 16, so NP = (P_a / 8 + P_b / 16) / 2."""
    return Fake(B={"a": 1.5, "b": 8.75}, z={"a": 0.5, "b": 0.25},
                g=[[{"a": 3, "b": 2}, {"a": 1, "b": 1}, {"a": 2, "b": 0}],
                   [{"a": 0, "b": 1}, {"a": 1, "b": 2}, {"a": 0, "b": 4}]],
                x=[{"a": 2, "b": 0}, {"a": 0, "b": 0}, {"a": 4, "b": 2}])


# With grid (p, s) = (1.0, 0.5) every w is 0.5. Layer l's term in M_G on d is
# t = 0.5 g0 + 0.5 g1 - 0.25 x, and in M_m it is 0.5 g_m; alpha adds z_d, beta does not:
#   a: l0 t = 1.5 - 0.5 = 1.0   l1 t = 0.5 + 0.5 = 1.0   l2 t = 1.0 - 1.0 = 0.0
#   b: l0 t = 1.0 + 0.5 = 1.5   l1 t = 0.5 + 1.0 = 1.5   l2 t = 2.0 - 0.5 = 1.5
KW, GRID = dict(domains=["a", "b"], n_layers=3), dict(grid_p=(1.0,), grid_s=(0.5,))
CONTRIB = {  # (alpha_alone, beta_alone, alpha_merge, beta_merge, gamma = aa + ba - am - bm)
    0: {"a": (2.0, 1.5, 1.5, 1.0, 1.0), "b": (0.75, 0.5, 1.75, 1.5, -2.0)},
    1: {"a": (1.0, 0.5, 1.5, 1.0, -1.0), "b": (1.25, 1.0, 1.75, 1.5, -1.0)},
    2: {"a": (1.5, 1.0, 0.5, 0.0, 2.0), "b": (2.25, 2.0, 1.75, 1.5, 1.0)},
}
# P(M_G): a = 1.5 + 0.5 + 2.0 = 4, b = 8.75 + 0.25 + 4.5 = 13.5 -> NP = (4/8 + 13.5/16) / 2
NP_G = 0.671875
# layer 2 severe (both gamma > 0; c_bb = 4.25 > c_aa = 2.5): expert 0's w at l2 -> 0, so t_b -> 2.0
NP_SEVERE = (4 / 8 + 14 / 16) / 2
# layer 0 partial (gamma_a > 0 > gamma_b), dominant = expert 1 (not in C) at w = 0.5 * 0.25 = 0.125:
# t_a = 1.5 - 0.5 * 0.125 * 2 = 1.375 (+0.375), t_b = 1.0 + 0.125 = 1.125 (-0.375)
NP_DOMINANT = (4.375 / 8 + 13.625 / 16) / 2
# weakened = expert 0 (in C) at w = 0.125: t_a = 0.375 - 0.125 = 0.25 (-0.75), t_b = 0.25 + 0.5 (-0.75)
NP_WEAKENED = (3.25 / 8 + 13.25 / 16) / 2


def test_stage1_picks_the_brute_force_grid_point():
    # by hand: with w = ps for both, P_a = 2 + 7w - 6w^2 and P_b = 9 + 10w - 2w^2, so NP peaks at
    # w = 6/7; the nearest grid product is 0.8 = 0.8 * 1.0 = 1.0 * 0.8, a tie the first point wins
    res = hi_merging(two(), domains=["a", "b"], n_layers=3, search=HiSearch(accept="always"))
    f, best, table = two(), None, {}
    for p in (0.2, 0.4, 0.6, 0.8, 1.0):
        for s in (0.2, 0.4, 0.6, 0.8, 1.0):
            got = f(Mix(experts=(0, 1), p=(p, p), s=(s, s)), ("a", "b"))
            table[p, s] = (got["a"] / 8 + got["b"] / 16) / 2
            best = (p, s) if best is None or table[p, s] > table[best] else best
    assert best == (0.8, 1.0) and (res.p, res.s) == best
    assert res.table == pytest.approx(table)
    assert res.np_stage1 == pytest.approx((3.76 / 8 + 15.72 / 16) / 2)        # w = 0.8
    assert res.table[1.0, 1.0] == pytest.approx((3 / 8 + 17 / 16) / 2)       # w = 1


def test_contributions_and_order_by_gamma():
    res = hi_merging(two(), search=HiSearch(**GRID), **KW)
    keys = ("alpha_alone", "beta_alone", "alpha_merge", "beta_merge", "gamma")
    got = {l: {d: tuple(c[k] for k in keys) for d, c in v.items()} for l, v in res.contributions.items()}
    assert got == CONTRIB
    assert res.order == [2, 0, 1]                                 # Gamma = 3, -1, -2
    assert (res.p, res.s, res.np_stage1) == (1.0, 0.5, NP_G)


@pytest.mark.parametrize("partial, pruned", [("dominant", 1), ("weakened", 0)])
def test_severe_partial_and_keep(partial, pruned):
    res = hi_merging(two(), search=HiSearch(partial=partial, accept="always", **GRID), **KW)
    assert res.mix == Mix(experts=(0, 1), p=(1.0, 1.0), s=(0.5, 0.5), layers=((0, pruned, 0.5, 0.25), (2, 0, 1.0, 0.0)))
    assert [(d["layer"], d["kind"], d["experts"], d["accepted"]) for d in res.decisions] == [
        (2, "severe", (0,), True), (0, "partial", (pruned,), True), (1, "keep", (), True)]
    assert res.decisions[0]["np_after"] == NP_SEVERE
    assert res.np_final == (NP_DOMINANT if partial == "dominant" else NP_WEAKENED)
    assert res.decisions[2]["np_before"] == res.decisions[2]["np_after"] == res.np_final


def test_no_worse_reverts_a_change_that_lowers_np():
    res = hi_merging(two(), search=HiSearch(partial="weakened", accept="no-worse", **GRID), **KW)
    d = res.decisions[1]
    assert (d["layer"], d["np_before"], d["np_after"], d["accepted"]) == (0, NP_SEVERE, NP_WEAKENED, False)
    assert res.mix.layers == ((2, 0, 1.0, 0.0),) and res.np_final == NP_SEVERE


def test_boundaries():
    # B_b = 0.75 makes both references 8, so the dominant partial at l0 (+0.375 on a, -0.375 on b)
    # leaves NP equal: no worse, so kept. x[1][b] = 2 makes gamma_b^1 = -1 + 0.5 * 2 = 0 exactly, which
    # is no conflict, so layer 1 (gamma_a^1 = -1) is kept; its Gamma = -1 ties layer 0's, index first.
    f = two()
    f.B["b"], f.x[1]["b"] = 0.75, 2
    res = hi_merging(f, search=HiSearch(accept="no-worse", **GRID), **KW)
    assert res.contributions[1]["b"]["gamma"] == 0 and res.order == [2, 0, 1]
    assert [(d["layer"], d["kind"], d["accepted"]) for d in res.decisions] == [
        (2, "severe", True), (0, "partial", True), (1, "keep", True)]
    assert res.decisions[1]["np_after"] == res.decisions[1]["np_before"]


# Evaluations for two(), as running totals after each scored Mix (a Mix takes all its domains or none):
#   references 1, 2 (each expert alone), 4 (base); stage 1: 6 (M_G); stage 2, layer 0: 8, 10 (M_G less
#   l0, M_G's l0 only), 11, 12, 13 (M_a, less l0, l0 only), 14, 15, 16 (M_b ...); layers 1, 2: +8 each
#   -> 24, 32; stage 3: 34 (severe at l2), 36 (partial at l0). 36 = T (|grid| + 3 + 5L) less the kept layer's 2.
@pytest.mark.parametrize("budget, evals", [(0, 0), (3, 2), (7, 6), (20, 20), (33, 32), (34, 34), (35, 34),
                                           (36, 36), (100, 36)])
def test_budget_stops_early_and_is_never_exceeded(budget, evals):
    f = two()
    res = hi_merging(f, search=HiSearch(max_evals=budget, accept="always", **GRID), **KW)
    assert res.evals == sum(f.calls.values()) == evals
    assert res.stopped_early == (budget < 36)
    if 6 <= budget < 34:                                            # stopped in stage 2 or at stage 3's first
        assert res.mix == Mix(experts=(0, 1), p=(1.0, 1.0), s=(0.5, 0.5)) and res.decisions == []
    if budget in (34, 35):                                          # the severe change is in, the partial not
        assert res.mix.layers == ((2, 0, 1.0, 0.0),) and res.np_final == NP_SEVERE


def test_every_pair_scored_once():
    # p = s = 1 beats p = 0.5 (NP 0.71875 > 0.671875), so each M_m is its reference, not scored again:
    # 4 references + 2 * 2 grid points + 0 + 24 stage 2 + 2 * 2 stage 3 (layers 0 and 2 change) = 36
    f = two()
    res = hi_merging(f, domains=["a", "b"], n_layers=3,
                     search=HiSearch(grid_p=(0.5, 1.0), grid_s=(1.0,), accept="always"))
    assert max(f.calls.values()) == 1
    assert (res.p, res.s) == (1.0, 1.0) and res.evals == sum(f.calls.values()) == 36


@pytest.mark.parametrize("partial, change1", [("dominant", ((1, 2, 0.5, 0.5),)),
                                              ("weakened", ((1, 0, 0.5, 0.5), (1, 1, 0.5, 0.5)))])
def test_three_experts(partial, change1):
    # w = 1 and z = 0: gamma_m = -2 sum_{e != m} g[e][l][d_m] + 2 * 3 pairs * x[l][d_m]
    #   layer 0: no cross g, x = 1 -> gamma = 6, 6, 6: severe; c_mm = 2 g_m = 2, 6, 4 keeps expert 1
    #   layer 1: x = .5, .5, 0 and g[0][1][c] = 1 -> gamma = 3, 3, -2: partial with C = {0, 1}
    f = Fake(B={"a": 1, "b": 1, "c": 1}, z={"a": 0, "b": 0, "c": 0},
             g=[[{"a": 1, "b": 0, "c": 0}, {"a": 1, "b": 0, "c": 1}],
                [{"a": 0, "b": 3, "c": 0}, {"a": 0, "b": 1, "c": 0}],
                [{"a": 0, "b": 0, "c": 2}, {"a": 0, "b": 0, "c": 1}]],
             x=[{"a": 1, "b": 1, "c": 1}, {"a": 0.5, "b": 0.5, "c": 0}])
    res = hi_merging(f, domains=["a", "b", "c"], n_layers=2,
                     search=HiSearch(grid_p=(1.0,), grid_s=(1.0,), partial=partial, accept="always"))
    gamma = {l: [c["gamma"] for c in v.values()] for l, v in res.contributions.items()}
    assert gamma == {0: [6, 6, 6], 1: [3, 3, -2]}
    assert res.order == [0, 1]
    assert [(d["kind"], d["experts"]) for d in res.decisions] == [
        ("severe", (0, 2)), ("partial", tuple(m for _, m, _, _ in change1))]
    assert res.mix.layers == ((0, 0, 1.0, 0.0), (0, 2, 1.0, 0.0)) + change1
    # 6 references + 3 stage 1 + 0 (M_m = references) + 4 * 3 * 2 stage 2 + 3 * 2 stage 3 = 39
    assert res.evals == 39 and max(f.calls.values()) == 1


def test_bad_arguments():
    for domains, kw in ((["a"], {}), (["a", "a"], {}), (["a", "b"], dict(partial="x")),
                        (["a", "b"], dict(accept="x"))):
        with pytest.raises(ValueError):
            hi_merging(two(), n_layers=3, domains=domains, search=HiSearch(**kw))
