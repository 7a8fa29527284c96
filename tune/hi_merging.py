"""Hi-Merging (Fu et al., ACL 2025, arXiv:2506.12379): model-wise, then layer-wise pruning and
scaling of the experts' deltas, guided by validation scores.

Pure search logic over an injected scorer: this module never touches files or tensors. A `Mix`
names one candidate merge; the caller's `score(mix, domains)` builds it (streamed TIES, sum
aggregation, so s does not cancel) and returns a validation score per asked domain.

    P_m(M)   = score of model M on domains[m]              (expert m's own task)
    NP(M)    = mean_m P_m(M) / P_m(x_m)                    x_m = expert m alone, p = s = 1; 0 skipped

Stage 1 (model-wise). One (p, s) in grid_p x grid_s shared by all experts (the author's
run_model_wise.sh writes one p and s into every model entry):
    M_G = b + TIES(s * TopP_p(d_1), ..., s * TopP_p(d_T)),   (p, s) = argmax NP(M_G)
    M_m = b + s * TopP_p(d_m)                               (expert m alone, same p, s)

Stage 2 (contribution of layer l to task m), d_X^l = X's delta in layer l only:
    alpha_{m,X}^l = P_m(M_X) - P_m(M_X - d_X^l)            (removal)
    beta_{m,X}^l  = P_m(b + d_X^l) - P_m(b)                (addition)
    c_{m,X}^l = alpha + beta,  X in {m, G}
    gamma_m^l = c_{m,m}^l - c_{m,G}^l                      (> 0: the merge hurts layer l for task m)
    Gamma^l   = sum_m gamma_m^l

Stage 3 (conflict resolution). Visit layers by decreasing Gamma^l; at each, C = {m : gamma_m^l > 0}:
    |C| = T      severe:  keep only argmax_m c_{m,m}^l at layer l; the others get s = 0 there
    0 < |C| < T  partial: prune and scale again at layer l with (p/2, s/2)
    C empty      keep:    nothing changes, nothing is scored

Open choices (the paper is pairwise and silent on these; the defaults are ours):
- T > 2: the three cases above are read through C, so T = 2 gives exactly the paper's
  (gamma_A, gamma_B > 0 / signs differ / both <= 0); "severe" needs every task to conflict.
- Which experts a partial conflict prunes: partial='dominant' (default) prunes the experts NOT
  in C, which dominate the layer in the merge (the English notes); 'weakened' prunes those in C
  (the Chinese note).
- Acceptance: accept='no-worse' (default) keeps a change only if NP of the re-scored merge does
  not drop, else reverts it; 'always' keeps every change.
- Stopping: each layer is visited once, in the Gamma order computed once from M_G (no
  re-analysis after a change); the search stops when the layers or max_evals run out.

Evaluations, one per new (Mix, domain) pair, memoised: at most T (|grid| + 3 + 5 L), that is
2T references (each expert alone, the base on all domains) + T |grid| (stage 1) + T (each M_m;
none when p = s = 1 wins, as M_m is then the reference) + 4 T L (stage 2) + T per changed layer
(stage 3, at most L). T = 2, L = 28, 5 x 5 grid: 336; the paper's 10 x 10 grid: 486.
"""
import itertools
from dataclasses import dataclass, field, replace
from statistics import fmean
from typing import Callable

PARTIAL = ("dominant", "weakened")
ACCEPT = ("no-worse", "always")


@dataclass(frozen=True, kw_only=True)
class Mix:
    """One model Hi-Merging evaluates: b + TIES over `experts` (per-tensor top-p trim of each delta,
    mass sign election, SUM of the agreeing s-scaled deltas; no normalisation, so s does not cancel),
    with per-layer overrides of (p, s), and optionally only one layer's merged delta kept (b + delta^l)
    or one layer's merged delta dropped (M - delta^l). Mix(experts=()) is the base b."""
    experts: tuple[int, ...] = ()                     # indices into the expert list, increasing
    p: tuple[float, ...] = ()                         # model-wise density per entry of `experts`
    s: tuple[float, ...] = ()                         # model-wise scale per entry of `experts`
    layers: tuple[tuple[int, int, float, float], ...] = ()   # (layer, expert index, p, s) overrides, sorted
    only_layer: int | None = None
    drop_layer: int | None = None


Scorer = Callable[[Mix, tuple[str, ...]], dict[str, float]]   # validation score per asked domain


@dataclass(frozen=True, kw_only=True)
class HiSearch:
    """How the search runs: the stage-1 grid (visited p outer, s inner; ties keep the first point), the
    evaluation budget (no (Mix, domain) pair beyond max_evals is scored; the search stops instead),
    which experts a partial conflict prunes ('dominant' or 'weakened') and whether a change that lowers
    NP is reverted (accept: 'no-worse' or 'always')."""
    grid_p: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    grid_s: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    max_evals: int | None = None
    partial: str = "dominant"
    accept: str = "no-worse"

    def __post_init__(self):
        if self.partial not in PARTIAL or self.accept not in ACCEPT:
            raise ValueError(f"partial must be one of {PARTIAL} and accept one of {ACCEPT}, "
                             f"got {self.partial!r} and {self.accept!r}")


@dataclass(kw_only=True)
class HiResult:
    """What the search found and how; filled stage by stage, so a budget cut leaves it consistent."""
    mix: Mix = Mix()                       # the final merge (the base until stage 1 scores a point)
    p: float | None = None                 # stage 1's model-wise density and scale
    s: float | None = None
    np_stage1: float = float("nan")        # NP(M_G)
    np_final: float = float("nan")         # NP(mix)
    contributions: dict = field(default_factory=dict)  # {layer: {domain: {alpha_alone, beta_alone,
    #                                                     alpha_merge, beta_merge, gamma}}}
    order: list[int] = field(default_factory=list)     # layers by decreasing Gamma
    decisions: list[dict] = field(default_factory=list)  # layer, kind, experts, np_before, np_after, accepted
    evals: int = 0                         # (Mix, domain) pairs scored
    stopped_early: bool = False            # max_evals ran out
    table: dict = field(default_factory=dict)          # stage 1: {(p, s): NP}


class _OutOfBudget(Exception):
    pass


@dataclass(kw_only=True)
class _Evals:
    """Memoised scoring under the budget; a Mix is scored on all its missing domains or not at all."""
    score: Scorer
    domains: tuple[str, ...]
    max_evals: int | None
    memo: dict = field(default_factory=dict)   # (Mix, domain) -> score
    refs: dict = field(default_factory=dict)   # domain -> its expert's score alone

    def scores(self, mix: Mix, domains: tuple[str, ...]) -> dict[str, float]:
        new = tuple(d for d in domains if (mix, d) not in self.memo)
        if new and self.max_evals is not None and len(self.memo) + len(new) > self.max_evals:
            raise _OutOfBudget
        if new:
            got = self.score(mix, new)
            self.memo.update({(mix, d): float(got[d]) for d in new})
        return {d: self.memo[mix, d] for d in domains}

    def one(self, mix: Mix, d: str) -> float:
        return self.scores(mix, (d,))[d]

    def np(self, mix: Mix) -> float:
        got = self.scores(mix, self.domains)
        return fmean(got[d] / r for d, r in self.refs.items() if r)


def hi_merging(score: Scorer, *, domains: list[str], n_layers: int, search: HiSearch = HiSearch(),
               log: Callable[[str], None] | None = None) -> HiResult:
    """Search a Hi-Merging merge of T = len(domains) experts.

    Args:
        score: builds a Mix and returns its validation score on each asked domain.
        domains: domains[i] is expert i's own task; at least two, distinct.
        n_layers: transformer blocks L, numbered 0..L-1 in Mix.layers / only_layer / drop_layer.
        search: the stage-1 grid, the evaluation budget and the open choices (HiSearch).
        log: called with one line per step.

    Returns:
        HiResult: the final Mix with its NP, stage 1's (p, s) and grid, stage 2's contributions
        and order, stage 3's decisions, the evaluation count and whether the budget cut it short.

    Example:
        res = hi_merging(my_scorer, domains=["math", "code"], n_layers=28, search=HiSearch(max_evals=400))
        merge(base, experts, res.mix)      # the caller's adapter turns the Mix into a model
    """
    if len(domains) < 2 or len(set(domains)) < len(domains):
        raise ValueError(f"hi_merging needs two or more distinct domains, one per expert, got {domains}")
    log = log or (lambda line: None)
    ev, res = _Evals(score=score, domains=tuple(domains), max_evals=search.max_evals), HiResult()
    try:
        ev.refs = {d: ev.one(Mix(experts=(i,), p=(1.0,), s=(1.0,)), d) for i, d in enumerate(domains)}
        if not any(ev.refs.values()):
            raise ValueError("every expert scores 0 alone on its own domain, so NP is undefined: "
                             "check the scorer")
        res.np_final = ev.np(res.mix)
        _model_wise(ev, res, search.grid_p, search.grid_s, log)
        _contributions(ev, res, n_layers)
        log(f"stage 2: layers by decreasing Gamma {res.order}")
        _resolve(ev, res, search.partial, search.accept, log)
    except _OutOfBudget:
        res.stopped_early = True
        log(f"evaluation budget of {search.max_evals} spent: stopping with NP {res.np_final:.4f}")
    res.evals = len(ev.memo)
    return res


def _model_wise(ev: _Evals, res: HiResult, grid_p, grid_s, log) -> None:
    everyone = tuple(range(len(ev.domains)))
    for p, s in itertools.product(grid_p, grid_s):
        g = Mix(experts=everyone, p=(p,) * len(everyone), s=(s,) * len(everyone))
        res.table[p, s] = v = ev.np(g)
        log(f"stage 1: p={p} s={s} NP={v:.4f}")
        if res.p is None or v > res.np_stage1:        # strict: ties keep the first in grid order
            res.mix, res.p, res.s, res.np_stage1, res.np_final = g, p, s, v, v


def _contributions(ev: _Evals, res: HiResult, n_layers: int) -> None:
    g, b, D = res.mix, Mix(), ev.domains
    P_g, P_b = ev.scores(g, D), ev.scores(b, D)
    for l in range(n_layers):
        # one call per merged model, on all domains, so the caller builds each model once
        drop_g, only_g = ev.scores(replace(g, drop_layer=l), D), ev.scores(replace(g, only_layer=l), D)
        layer = {}
        for m, d in enumerate(D):
            alone = Mix(experts=(m,), p=(res.p,), s=(res.s,))    # M_m, scored on its own task only
            c = {"alpha_alone": ev.one(alone, d) - ev.one(replace(alone, drop_layer=l), d),
                 "beta_alone": ev.one(replace(alone, only_layer=l), d) - P_b[d],
                 "alpha_merge": P_g[d] - drop_g[d],
                 "beta_merge": only_g[d] - P_b[d]}
            c["gamma"] = c["alpha_alone"] + c["beta_alone"] - c["alpha_merge"] - c["beta_merge"]
            layer[d] = c
        res.contributions[l] = layer
    Gamma = {l: sum(c["gamma"] for c in layer.values()) for l, layer in res.contributions.items()}
    res.order = sorted(Gamma, key=lambda l: -Gamma[l])   # stable: equal Gamma by layer index


def _settle(gamma: list[float], own: list[float], p: float, s: float, partial: str):
    """Stage 3's case at one layer: (kind, {expert: (p, s) override at the layer})."""
    T, C = len(gamma), {m for m, x in enumerate(gamma) if x > 0}
    if len(C) == T:
        keep = max(range(T), key=own.__getitem__)          # ties: the first expert
        return "severe", {m: (p, 0.0) for m in range(T) if m != keep}
    if C:
        pruned = set(range(T)) - C if partial == "dominant" else C
        return "partial", {m: (p / 2, s / 2) for m in sorted(pruned)}
    return "keep", {}


def _resolve(ev: _Evals, res: HiResult, partial: str, accept: str, log) -> None:
    for l in res.order:
        cs = [res.contributions[l][d] for d in ev.domains]
        own = [c["alpha_alone"] + c["beta_alone"] for c in cs]          # c_{m,m}^l
        kind, change = _settle([c["gamma"] for c in cs], own, res.p, res.s, partial)
        before = after = res.np_final
        ok = True
        if change:
            new = tuple((l, m, pm, sm) for m, (pm, sm) in change.items())
            cand = replace(res.mix, layers=tuple(sorted(res.mix.layers + new)))
            after = ev.np(cand)
            ok = accept == "always" or after >= before
            if ok:
                res.mix, res.np_final = cand, after
        res.decisions.append(dict(layer=l, kind=kind, experts=tuple(change), np_before=before,
                                  np_after=after, accepted=ok))
        log(f"stage 3: layer {l} {kind} experts {tuple(change)} NP {before:.4f} -> {after:.4f}"
            f"{'' if ok else ' (reverted)'}")
