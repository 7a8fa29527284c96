"""Hi-Merging on real models: every Mix the algorithm (hi_merging.py) asks about becomes a streamed
TIES merge (per-tensor top-p, mass sign, sum of s-scaled agreeing deltas, embeddings kept at the
base) with per-layer overrides, scored on the validation split through the tuning cache; the final
Mix is merged into the output folder, whose tune.json records every decision and the time split.
"""
import time
from pathlib import Path

from ..common import roles
from ..common.errors import BadParameter
from ..engine import api
from ..engine.inputs.index import TensorIndex
from . import runners
from .best import save_record
from .database import ScoreStore
from .hi_merging import HiSearch, Mix, hi_merging
from .rungs import Evaluator
from .score import Candidate, Validation
from .search import expert_domains

TIES_SUM = {"aggregate": "sum", "consensus": "sum", "sparsify_scope": "tensor", "scale": 1.0}


def n_layers(folder: Path) -> int:
    """Decoder layers of a model folder (common/roles.py reads them from its tensor names)."""
    found = roles.layer_count(TensorIndex.from_folder(folder).tensors)
    if not found:
        raise BadParameter(f"{folder}: no tensor named like a decoder layer's ('layers.N.', 'h.N.'); Hi-Merging "
                           f"works on transformer blocks")
    return found


def layer_regex(layer: int) -> str:
    return roles.layer_pattern(layer)


def candidate(mix: Mix, experts: list[str], base: str | None, layers: int) -> Candidate:
    """The TIES merge a Mix stands for: model-wise (p, s) per expert, per-layer overrides, and for
    only_layer / drop_layer a zero scale everywhere else / on that layer."""
    where = {e: k for k, e in enumerate(mix.experts)}
    overrides = []
    for layer in range(layers):
        p, s = list(mix.p), list(mix.s)
        for l, e, lp, ls in mix.layers:
            if l == layer:
                p[where[e]], s[where[e]] = lp, ls
        scale = 0.0 if layer == mix.drop_layer or (mix.only_layer is not None and layer != mix.only_layer) else 1.0
        if (p, s, scale) != (list(mix.p), list(mix.s), 1.0) or layer == mix.only_layer:  # before the catch-all
            overrides.append((layer_regex(layer), {"density": p, "weights": s, "scale": scale}))
    if mix.only_layer is not None:
        overrides.append((".", {"scale": 0.0}))  # outside the kept layer (norms, ...): the base
    params = {**TIES_SUM, "density": list(mix.p), "weights": list(mix.s)}
    return Candidate(method="ties", experts=tuple(experts[e] for e in mix.experts), base=base, params=params,
                     overrides=tuple(overrides))


class Scorer:
    """hi_merging's scorer: validation scores of a Mix on all examples, from the score store or merged
    and scored; the base and each unpruned expert alone are their own folders. Counts merge and
    validation time."""

    def __init__(self, *, experts: list[str], base: str | None, v: Validation, progress=None,
                 storage: str | None = None):
        self.experts, self.base, self.v, self.progress = experts, base, v, progress
        self.evaluator = Evaluator(store=ScoreStore(storage), v=v, runner=runners.Local())
        self.seconds = {"merge": 0.0, "validation": 0.0}
        base_src, expert_src = Candidate(method="ties", experts=tuple(experts), base=base).sources()
        self.folders = {"base": base_src.path, **{i: s.path for i, s in enumerate(expert_src)}}
        self.layers = n_layers(self.folders["base"])

    def __call__(self, mix: Mix, domains) -> dict:
        model = self._plain(mix)
        model = str(model) if model is not None else candidate(mix, self.experts, self.base, self.layers)
        s = self.evaluator.score([model], [list(domains)])[0]
        if s.evaluated and self.progress:
            self.progress(f"scored {mix} on {', '.join(domains)}")
        self.seconds["merge"] += s.merge_seconds
        self.seconds["validation"] += s.validation_seconds
        return s.scores

    def _plain(self, mix: Mix) -> Path | None:
        if not mix.experts:
            return self.folders["base"]
        plain = not mix.layers and mix.only_layer is None and mix.drop_layer is None
        if plain and len(mix.experts) == 1 and mix.p == (1.0,) and mix.s == (1.0,):
            return self.folders[mix.experts[0]]
        return None


def hi_search(grid: dict | None = None, **options) -> HiSearch:
    """The search of `mbmerge tune --method hi_merging`: grid {"p": [...], "s": [...]} for stage 1 (text or
    numbers; default: hi_merging's), options: HiSearch's others (max_evals, partial, accept)."""
    grid = {k: [float(x) for x in vals] for k, vals in (grid or {}).items()}
    unknown = set(grid) - {"p", "s"}
    if unknown:
        raise BadParameter(f"hi_merging's grid has p and s, not {', '.join(sorted(unknown))}")
    try:
        return HiSearch(**{f"grid_{k}": tuple(vals) for k, vals in grid.items()}, **options)
    except ValueError as e:
        raise BadParameter(f"hi_merging: {e}") from None


def hi_merge(*, experts, out, base: str | None = None, validation: Validation | None = None,
             search: HiSearch = HiSearch(), overwrite: bool = False, progress=None, storage: str | None = None) -> dict:
    """Hi-Merging of EXPERTS into OUT, scored as `validation` says (default: on the validation split of
    each expert's domain, tune.score.Validation); search: the stage-1 grid, the evaluation budget and
    the open choices (HiSearch; hi_search builds it from a --grid); storage: the score store's database
    URL (default: the mbmerge cache's)."""
    started = time.perf_counter()
    v = validation or Validation(tuple(expert_domains(experts)))
    scorer = Scorer(experts=list(experts), base=base, v=v, progress=progress, storage=storage)
    try:
        result = hi_merging(scorer, domains=list(v.domains), n_layers=scorer.layers, search=search, log=progress)
    except ValueError as e:   # e.g. experts that score 0 on their own domain: no NP to guide the search
        raise BadParameter(f"hi_merging: {e}") from None
    final = candidate(result.mix, list(experts), base, scorer.layers)
    api.run(final.spec(Path(out), overwrite=overwrite, resume=True))
    record = {"method": "hi_merging", "validate": list(v.domains), "limit": v.limit, "max_evals": search.max_evals,
              "stage1": {"p": result.p, "s": result.s, "np": result.np_stage1}, "np_final": result.np_final,
              "evals": result.evals, "stopped_early": result.stopped_early, "order": result.order,
              "decisions": result.decisions, "contributions": result.contributions,
              "seconds": {**scorer.seconds, "this_run": time.perf_counter() - started}}
    record["summary"] = (f"Hi-Merging: stage 1 p={result.p} s={result.s} NP {result.np_stage1:.3f}; after "
                         f"{len(result.decisions)} layer decisions NP {result.np_final:.3f}; {result.evals} "
                         f"evaluations, merge {scorer.seconds['merge']:.1f} s, validation "
                         f"{scorer.seconds['validation']:.1f} s")
    save_record(Path(out), record)
    return record
