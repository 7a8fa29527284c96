"""`mbmerge tune`: the best parameters of a method on validation data, searched by an Optuna study.

The study lives in the tuning database (tune.database: SQLite in the mbmerge cache, or any URL), named
by everything that fixes its scores, so a rerun of the same command resumes it and several processes
or machines can share it. Trials are claimed in batches (tune.study); a batch's candidates are
merged and scored rung by rung (tune.rungs: all examples, or growing shares under successive
halving, tune.pruning), in this process or as Ray tasks (tune.runners). With nothing left to claim,
a driver waits for the trials other processes still run; then the best completed trial is merged
again into the output folder (tune.best), with a table of every trial (tune.record) and MergeBench's
time split: merge (algorithm) time against validation time.
"""
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..common.errors import BadParameter, MbmergeError
from ..common.names import domain_names
from . import best as best_out, runners
from .database import ScoreStore, default_url
from .layers import trial_candidate
from .objectives import FORGETTING, NP, Objective, parse as parse_objectives, values_text
from .pruning import ETA, HALVING, fractions, halved, pruner
from .record import params_text, searched, study_record
from .rungs import Evaluator
from .runners import RunnerSettings
from .score import Candidate, Validation, domain_np, model_key, normalised
from .space import Space, point_key
from .study import claim, heartbeats, open_study, wait_for_others

SEARCH_TRIALS = 20     # a TPE or CMA-ES study's default budget


@dataclass(frozen=True, kw_only=True)
class Search:
    """What a study searches and how, and where it is kept.

    grid: {name: values or (low, high)} (default: the method's registry row's grid); sampler: grid |
    tpe | cmaes, with `trials` a search's budget (default 20) and per_expert the parameters searched
    one value per expert and per_layer the groups of layers each numeric range is searched for (tune.layers);
    objective: what the study optimises (tune.objectives: np, forgetting, task lists; several: a Pareto front),
    max_forgetting: the best is the best on the first objective among trials that forget at most this;
    prune: None | "halving"; storage, study: the study's database URL and name (default: the mbmerge cache, a
    name from the settings, so a rerun resumes it)."""
    grid: dict | None = None
    sampler: str = "grid"
    trials: int | None = None
    per_expert: tuple[str, ...] = ()
    per_layer: int = 1
    objective: str = NP
    max_forgetting: float | None = None
    prune: str | None = None
    storage: str | None = None
    study: str | None = None


@dataclass(frozen=True, kw_only=True)
class StudyRun:
    """The study this process runs trials of: the Optuna study and its storage in the database at
    `url`, the space it searches, its pruning and its budget of trials."""
    st: optuna.Study
    storage: object
    url: str
    space: Space
    prune: str | None
    budget: int
    objectives: tuple[Objective, ...] = (Objective(NP),)


def tune(template: Candidate, *, out, validation: Validation | None = None, search: Search = Search(),
         runner: RunnerSettings = RunnerSettings(), overwrite: bool = False, show: bool = False,
         progress=None) -> dict:
    """Search the parameters of TEMPLATE's method (the candidates' shared recipe: method, experts, base,
    protocol, fixed parameters, a data-aware method's statistics folders or data; see merge) on the
    validation split of each expert's domain, merge the best into OUT, and return (and write to
    OUT/tune.json) every trial and the time split.

    validation: how candidates are scored (tune.score.Validation; default: each expert's own domain,
    device None); its device None: cuda when the trials hold GPUs, else cpu. search: what is searched,
    with which sampler and pruning, and where the study is kept (Search). runner: where trials run
    (runners.RunnerSettings: in this process, or Ray). show: only read the study and report.
    this_run["merged"]: False when OUT already held the best (a finished study).

    Example:
        tune(Candidate(method="ties", experts=("math", "coding")), out="best/",
             search=Search(grid={"density": [0.2, 0.4], "scale": [0.5, 1.0]}, prune="halving"))
    """
    started, out, experts = time.perf_counter(), Path(out), template.experts
    v = validation or Validation(tuple(expert_domains(experts)), device=None)
    if len(v.domains) != len(experts):
        raise BadParameter(f"{len(v.domains)} validation domain(s) for {len(experts)} experts; give one per expert")
    v.plan()     # a mistyped domain said now, in one line
    objectives = _objectives(search, v)
    space = Space.build(template.method, search.grid, search.sampler, search.per_expert, len(experts),
                        search.per_layer)
    _check(template, space, out)
    earlier = None if show else best_out.check_out(out, overwrite)
    url = search.storage or default_url()
    budget = len(space.points()) if space.sampler == "grid" else (search.trials or SEARCH_TRIALS)
    run = {"evaluated": 0, "failed": []}
    workers = None if show else runners.make(runner)
    try:
        v = replace(v, device=v.device or ("cuda" if getattr(workers, "gpus", 0) else "cpu"))
        name = search.study or study_name(template, space, v, search.prune, objectives)
        ours = not show and best_out.check_study(out, earlier, name, url, overwrite)
        st, storage = open_study(name, url, space, pruner(search.prune), create=not show,
                                 directions=[o.direction for o in objectives])
        if not show:
            study = StudyRun(st=st, storage=storage, url=url, space=space, prune=search.prune, budget=budget,
                             objectives=objectives)
            run_study(study, template, v, workers, run, progress)
    finally:
        workers and workers.close()
    record = study_record(st, template.method, v, space, search, name, url, objectives)
    best = record["best"]
    if best is None:
        raise BadParameter(f"study {name}: " + (record.get("unmet") or "no trial completed")
                           + (f" ({run['failed'][0]})" if run["failed"] else ""))
    if not show:
        final = time.perf_counter()
        run["merged"] = best_out.write(candidate(template, space, best["params"]), best, out, earlier, ours,
                                       overwrite, v.device)
        record["seconds"]["merge"] += time.perf_counter() - final
    record["seconds"]["this_run"] = time.perf_counter() - started
    record["this_run"] = run
    if not show:
        best_out.save_record(out, record)
    return record


def _objectives(search: Search, v: Validation) -> tuple[Objective, ...]:
    """The study's objectives, checked against its sampler and limits (their tasks planned: one line for a
    family that has none)."""
    objectives = parse_objectives(search.objective)
    names = [o.name for o in objectives]
    if search.max_forgetting is not None and FORGETTING not in names:
        raise BadParameter(f"--max-forgetting needs forgetting among the objectives (--objective {names[0]},"
                           f"forgetting)")
    if len(objectives) > 1 and search.sampler == "cmaes":
        raise BadParameter("--sampler cmaes optimises one objective; for several use tpe or nsga2")
    for o in objectives:
        o.domain and o.tasks(v)
    return objectives


def run_study(study: StudyRun, template: Candidate, v: Validation, runner, run: dict, progress=None) -> None:
    """Claim and run batches of trials until the study needs no more, then wait for those other
    processes still run (and claim again if one of them was given up). The experts are scored only
    once there is a trial to run: a finished study's rerun scores nothing."""
    st, storage, url = study.st, study.storage, study.url
    size, failed, refs = claim_size(study.space, study.prune, study.budget, runner.concurrency), set(), None
    extra = {o.domain: o.tasks(v) for o in study.objectives if o.domain}
    ev = Evaluator(store=ScoreStore(url), v=v, runner=runner, fractions=fractions(study.prune), pieces=HALVING,
                   extra=extra)
    while True:
        while batch := claim(st, storage, url, study.space, size, study.budget, failed):
            with heartbeats(st, storage, batch):
                refs = refs or references(ev, template, [o.domain for o in study.objectives if o.name == FORGETTING],
                                          progress)
                run_batch(study, batch, template, ev, refs, failed, run, progress)
        if not wait_for_others(st, url, progress):
            return


def claim_size(space: Space, prune: str | None, budget: int, concurrency: int) -> int:
    """Trials claimed at once: halving judges a whole batch at a rung (a grid: all of it; a search: a
    bracket of ETA^2, so its sampler learns from the brackets before); else as many as run at once."""
    if prune != "halving":
        return concurrency
    return budget if space.sampler == "grid" else ETA ** 2


def _check(template: Candidate, space: Space, out: Path) -> None:
    """Every grid point's (or every range end's) parameters checked before anything runs."""
    if space.sampler == "grid":
        tries = space.points()
    else:
        tries = [{k: (r[0] if isinstance(r, list) else r[end]) for k, r in space.ranges.items()} for end in (0, 1)]
        tries = [{k: [x] * space.n_experts if k in space.per_expert else x for k, x in t.items()} for t in tries]
        tries = [{k: [x] * space.groups if k in space.layered() else x for k, x in t.items()} for t in tries]
    for p in tries:
        candidate(template, space, {**template.params, **p}).merge_spec(out)


def candidate(template: Candidate, space: Space, params: dict) -> Candidate:
    """The merge of a point of the space: the template with `params`, or its per-layer recipe (tune.layers)."""
    return trial_candidate(template, params, space.groups, space.layered())


def study_name(template: Candidate, space: Space, v: Validation, prune: str | None,
               objectives=(Objective(NP),)) -> str:
    """The default study: one per (recipe without the searched values, inputs, space, validation, pruning,
    objectives: named only when they are not NP alone, so that earlier studies resume)."""
    names = [o.name for o in objectives]
    text = json.dumps({"model": model_key(template), "space": space.describe(), "validation": asdict(v),
                       "prune": prune or "none", **({"objectives": names} if names != [NP] else {})},
                      sort_keys=True, default=str)
    return f"mbmerge-{template.method}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def references(ev: Evaluator, template: Candidate, extra: list[str] = (), progress=None) -> list[tuple[dict, dict]]:
    """At every rung, (each expert's score on its own domain, the base's on `extra`, forgetting's general
    tasks): ({domain: score}, {name: score}), NP's and forgetting's denominators on the candidates' examples."""
    base, experts = template.sources()
    folders = [str(e.path) for e in experts] + ([str((base or experts[0]).path)] if extra else [])
    doms = [[d] for d in ev.v.domains] + ([list(extra)] if extra else [])
    for folder, s in zip(folders, ev.score(folders, doms)):     # every range at once, one job a model
        if s.error:
            raise MbmergeError(f"{folder} could not be scored: {s.error}")
    progress and progress(f"experts scored on their own domains ({', '.join(ev.v.domains)})"
                          + (f", the base on {', '.join(extra)}" if extra else ""))
    out = []
    for r in range(ev.rungs):
        scored = ev.score(folders, doms, rung=r)
        out.append(({d: s.scores[d] for s, (d,) in zip(scored, doms)}, scored[-1].scores if extra else {}))
    return out


def run_batch(study: StudyRun, trials, template: Candidate, ev: Evaluator, refs, failed: set, run: dict,
              progress=None) -> None:
    """Merge and score a batch of trials rung by rung: all report a rung, then the pruner keeps the best;
    the rest are told PRUNED, the last rung's COMPLETE with their NP on every example."""
    st, space = study.st, study.space
    alive = []
    for t in trials:
        params = {**template.params, **space.suggest(t)}
        t.set_user_attr("params", params)
        alive.append((t, candidate(template, space, params)))
    objectives = study.objectives
    domains = list(ev.v.domains) + [o.domain for o in objectives if o.domain]
    for r in range(ev.rungs):
        results = ev.score([c for _, c in alive], [domains] * len(alive), rung=r)
        scored = []
        for (t, c), s in zip(alive, results):
            run["evaluated"] += s.evaluated
            if s.error:
                t.set_user_attr("error", s.error)
                st.tell(t, state=TrialState.FAIL)
                failed.add(point_key(t.params))
                run["failed"].append(f"trial {t.number}: {s.error}")
                progress and progress(f"trial {t.number} failed: {s.error}")
                continue
            experts, base = refs[r]
            values = [o.value(s.scores, experts, base, ev.v) for o in objectives]
            for k, x in {"scores": s.scores, "np": normalised(s.scores, experts, ev.v),
                         "np_by_domain": domain_np(s.scores, experts, ev.v),
                         "objectives": dict(zip([o.name for o in objectives], values)), "rung": r,
                         "examples": s.examples,
                         "merge_seconds": s.merge_seconds, "validation_seconds": s.validation_seconds}.items():
                t.set_user_attr(k, x)
            if r < ev.rungs - 1 and len(objectives) == 1 and values[0] is not None:
                t.report(values[0], r)
            scored.append((t, values))
        last = r == ev.rungs - 1
        pruned = [] if last else halved(scored, objectives)     # after every trial reported
        for t in pruned:
            st.tell(t, state=TrialState.PRUNED)
        kept = [(t, values) for t, values in scored if t not in pruned]
        if progress:
            rung = f"rung {r + 1}/{ev.rungs} ({ev.fractions[r]:.0%} of the examples): " if ev.rungs > 1 else ""
            for t, values in scored:
                shown = params_text(searched(space, t.user_attrs["params"]))
                progress(f"{rung}trial {t.number} {shown}: {values_text([o.name for o in objectives], values)}")
            if not last:
                progress(f"{rung}{len(kept)} of {len(scored)} go on")
        alive = [(t, c) for t, c in alive if any(t is k for k, _ in kept)]
        if last:
            for t, values in kept:
                told = [o.told(x) for o, x in zip(objectives, values)]
                st.tell(t, told[0] if len(told) == 1 else told)


def expert_domains(experts) -> list[str]:
    """Each domain expert's domain name (math, coding, ...): the default validation domains."""
    names = domain_names(experts)
    if names is None:
        raise BadParameter("--validate DOMAIN,... is needed: the experts are not domain names")
    return names
