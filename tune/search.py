"""`mbmerge tune`: the best parameters of a method on validation data, searched by an Optuna study.

The study lives in the tuning database (tune.store: SQLite in the mbmerge cache, or any URL), named
by everything that fixes its scores, so a rerun of the same command resumes it and several processes
or machines can share it. Trials are claimed in batches (tune.study); a batch's candidates are
merged and scored rung by rung (tune.evaluate: all examples, or growing shares under successive
halving, tune.pruning), in this process or as Ray tasks (tune.runners). The best completed trial is
merged again into the output folder, with a table of every trial and MergeBench's time split:
merge (algorithm) time against validation time.
"""
import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from optuna.trial import TrialState

from ..common.errors import BadParameter, MbmergeError
from ..common.names import domain_names
from ..engine import api
from . import runners
from .evaluate import Evaluator
from .pruning import ETA, fractions, pruner
from .score import Candidate, Validation, domain_np, model_key, normalised
from .space import Space, point_key
from .study import claim, heartbeats, open_study
from .store import ScoreStore, default_url

SEARCH_TRIALS = 20     # a TPE or CMA-ES study's default budget


def tune(method: str, *, experts, out, base: str | None = None, grid: dict | None = None,
         validate: list[str] | None = None, sampler: str = "grid", trials: int | None = None, per_expert=(),
         prune: str | None = None, storage: str | None = None, study: str | None = None, ray: str | None = None,
         jobs: int = 1, cpus_per_trial: float | None = None, gpus_per_trial: float | None = None, retries: int = 2,
         protocol: str | None = "mergebench", limit: int | None = None, batch_size: int = 64, device: str | None = None,
         overwrite: bool = False, progress=None, stats_folders: list | None = None, data: list | None = None,
         show: bool = False, **params) -> dict:
    """Search METHOD's parameters (grid: {name: values or (low, high)}; default: its registry row's grid)
    on the validation split of each expert's domain (validate; default: the experts' own domain names),
    merge the best into OUT, and return (and write to OUT/tune.json) every trial and the time split.

    sampler: grid | tpe | cmaes (trials: a search's budget; per_expert: parameters searched one value
    per expert); prune: None | "halving"; storage, study: the study's database URL and name (default:
    the mbmerge cache, a name from the settings); ray: None, "local" or a cluster address, with jobs,
    cpus_per_trial, gpus_per_trial and retries (runners.make); device: where trials merge and score
    (default: cuda when the trials hold GPUs, else cpu); show: only read the study and report.
    params: fixed parameters of every candidate; stats_folders/data: a data-aware method's (see merge)."""
    started = time.perf_counter()
    v = Validation(tuple(validate or expert_domains(experts)), limit=limit, batch_size=batch_size)
    if len(v.domains) != len(experts):
        raise BadParameter(f"{len(v.domains)} validation domain(s) for {len(experts)} experts; give one per expert")
    space = Space.build(method, grid, sampler, per_expert, len(experts))
    template = Candidate(method=method, experts=tuple(experts), base=base, params=params,
                         stats_folders=tuple(stats_folders or ()) or None, data=tuple(data) if data else None,
                         protocol=protocol)
    _check(template, space, Path(out))
    url = storage or default_url()
    budget = len(space.points()) if space.sampler == "grid" else (trials or SEARCH_TRIALS)
    run = {"evaluated": 0, "failed": []}
    runner = None if show else runners.make(ray, jobs, cpus_per_trial, gpus_per_trial, retries)
    try:
        v = replace(v, device=device or ("cuda" if getattr(runner, "gpus", 0) else "cpu"))
        name = study or study_name(template, space, v, prune)
        st, store_ = open_study(name, url, space, pruner(prune), create=not show)
        if not show:
            ev = Evaluator(ScoreStore(url), v, runner, fractions(prune))
            refs = references(ev, template, progress)
            size = claim_size(space, prune, budget, runner.concurrency)
            failed = set()
            while batch := claim(st, store_, url, space, size, budget, failed):
                run_batch(st, store_, batch, space, template, ev, refs, failed, run, progress)
    finally:
        runner and runner.close()
    record = study_record(st, method, v, space, prune, name, url)
    best = record["best"]
    if best is None:
        raise BadParameter(f"study {name}: no trial completed" + (f" ({run['failed'][0]})" if run["failed"] else ""))
    if not show:
        final = time.perf_counter()
        api.run(replace(template, params=best["params"]).spec(Path(out), overwrite=overwrite, resume=True,
                                                               device=v.device))
        record["seconds"]["merge"] += time.perf_counter() - final
    record["seconds"]["this_run"] = time.perf_counter() - started
    record["this_run"] = run
    if not show:
        (Path(out) / "tune.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


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
    for p in tries:
        replace(template, params={**template.params, **p}).merge_spec(out)


def study_name(template: Candidate, space: Space, v: Validation, prune: str | None) -> str:
    """The default study: one per (recipe without the searched values, inputs, space, validation, pruning)."""
    text = json.dumps({"model": model_key(template), "space": space.describe(), "validation": asdict(v),
                       "prune": prune or "none"}, sort_keys=True, default=str)
    return f"mbmerge-{template.method}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def references(ev: Evaluator, template: Candidate, progress=None) -> list[dict]:
    """Each expert's score on its own domain at every rung: {domain: score} a rung (NP's denominators,
    on the same examples as the candidates')."""
    base, experts = template.sources()
    folders = [str(e.path) for e in experts]
    doms = [[d] for d in ev.v.domains]
    for folder, s in zip(folders, ev.score(folders, doms)):     # every range at once, one job an expert
        if s.error:
            raise MbmergeError(f"expert {folder} could not be scored: {s.error}")
    progress and progress(f"experts scored on their own domains ({', '.join(ev.v.domains)})")
    return [{d: s.scores[d] for s, (d,) in zip(ev.score(folders, doms, rung=r), doms)} for r in range(ev.rungs)]


def run_batch(st, storage, trials, space: Space, template: Candidate, ev: Evaluator, refs, failed: set, run: dict,
              progress=None) -> None:
    """Merge and score a batch of trials rung by rung: all report a rung, then the pruner keeps the best;
    the rest are told PRUNED, the last rung's COMPLETE with their NP on every example."""
    with heartbeats(st, storage, trials):
        alive = []
        for t in trials:
            params = {**template.params, **space.suggest(t)}
            t.set_user_attr("params", params)
            alive.append((t, replace(template, params=params)))
        for r in range(ev.rungs):
            results = ev.score([c for _, c in alive], [list(ev.v.domains)] * len(alive), rung=r)
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
                np = normalised(s.scores, refs[r], ev.v)
                for k, x in {"scores": s.scores, "np": np, "np_by_domain": domain_np(s.scores, refs[r], ev.v),
                             "rung": r, "examples": s.examples,
                             "merge_seconds": s.merge_seconds, "validation_seconds": s.validation_seconds}.items():
                    t.set_user_attr(k, x)
                if r < ev.rungs - 1 and np is not None:
                    t.report(np, r)
                scored.append((t, np))
            last = r == ev.rungs - 1
            pruned = [] if last else [t for t, _ in scored if t.should_prune()]   # after every trial reported
            for t in pruned:
                st.tell(t, state=TrialState.PRUNED)
            kept = [(t, np) for t, np in scored if t not in pruned]
            if progress:
                rung = f"rung {r + 1}/{ev.rungs} ({ev.fractions[r]:.0%} of the examples): " if ev.rungs > 1 else ""
                for t, np in scored:
                    shown = _params(_searched(space, t.user_attrs["params"]))
                    progress(f"{rung}trial {t.number} {shown}: NP {'—' if np is None else f'{np:.3f}'}")
                if not last:
                    progress(f"{rung}{len(kept)} of {len(scored)} go on")
            alive = [(t, c) for t, c in alive if any(t is k for k, _ in kept)]
            if last:
                for t, np in kept:
                    st.tell(t, np if np is not None else 0.0)


def _searched(space: Space, params: dict) -> dict:
    """The searched ones of a trial's parameters (the rest are the command's fixed ones)."""
    return {k: x for k, x in params.items() if k in (space.grid or space.ranges)}


def _params(searched: dict) -> str:
    return " ".join(f"{k}={_short(x)}" for k, x in searched.items())


def study_record(st, method: str, v: Validation, space: Space, prune, name: str, url: str) -> dict:
    """Every trial of the study (any process's), the best completed one and the time split."""
    rows = []
    for t in st.get_trials(deepcopy=False):
        a = t.user_attrs
        if t.state == TrialState.WAITING or "params" not in a:
            continue
        rows.append({"number": t.number, "state": t.state.name.lower(), "params": a["params"],
                     "searched": _searched(space, a["params"]), "scores": a.get("scores", {}), "np": a.get("np"),
                     "np_by_domain": a.get("np_by_domain", {}), "rung": a.get("rung"),
                     "examples": a.get("examples", 0), "merge_seconds": a.get("merge_seconds", 0.0),
                     "validation_seconds": a.get("validation_seconds", 0.0), "error": a.get("error")})
    done = [r for r in rows if r["state"] == "complete"]
    best = max(done, key=lambda r: (r["np"] is not None, r["np"] or 0, -r["number"]), default=None)
    return {"method": method, "study": name, "storage": url, **space.describe(), "prune": prune or "none",
            "validate": list(v.domains), "limit": v.limit, "trials": rows,
            "best": None if best is None else {"number": best["number"], "params": best["params"], "np": best["np"],
                                                **_undefined_note(done)},
            "seconds": {"merge": sum(r["merge_seconds"] for r in rows),
                        "validation": sum(r["validation_seconds"] for r in rows)},
            "examples": sum(r["examples"] for r in rows)}


def _undefined_note(rows: list[dict]) -> dict:
    """{"note": ...} when no trial has a normalised performance to choose by (NP divides by each
    expert's own score: every expert scoring 0 on its own domain, as the micro zoo's do, leaves it
    undefined), so "best" is only the first trial; else {}."""
    if any(r["np"] is not None for r in rows):
        return {}
    return {"note": "every candidate's NP is undefined (every expert scores 0 on its own domain, or no "
                    "domain was scored); picked the first candidate"}


def expert_domains(experts) -> list[str]:
    """Each domain expert's domain name (math, coding, ...): the default validation domains."""
    names = domain_names(experts)
    if names is None:
        raise BadParameter("--validate DOMAIN,... is needed: the experts are not domain names")
    return names


def table(record: dict) -> str:
    """Markdown: every trial with its NP on each domain (its validation score there when the expert
    scores 0) and its mean NP (the best marked), then the time split."""
    domains = record["validate"]
    head = ["trial", "params", *(f"{d} NP" for d in domains), "NP", "examples", "merge s", "validation s", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = (record["best"] or {}).get("number")
    for r in record["trials"]:
        mark = "best" if r["number"] == best else (r["state"] if r["state"] != "complete" else "")
        cells = [str(r["number"]), _params(r["searched"]),
                 *(_domain_cell(r, d) for d in domains),
                 f"{r['np']:.3f}" if r["np"] is not None else "—", str(r["examples"]),
                 f"{r['merge_seconds']:.2f}", f"{r['validation_seconds']:.1f}", mark]
        lines.append("| " + " | ".join(cells) + " |")
    if (record["best"] or {}).get("note"):
        lines.append(f"\nbest: {record['best']['note']}")
    s, run = record["seconds"], record.get("this_run", {})
    lines.append(f"\nmerge (algorithm) time {s['merge']:.1f} s, validation time {s['validation']:.1f} s, "
                 f"{record['examples']} validation examples behind the scores"
                 + (f" ({run['evaluated']} evaluated in this run)" if "evaluated" in run else "")
                 + f"; study {record['study']}")
    return "\n".join(lines)


def _domain_cell(row: dict, domain: str) -> str:
    np, score = row["np_by_domain"].get(domain), row["scores"].get(domain)
    return f"{np:.3f}" if np is not None else "—" if score is None else f"({score:.3f})"


def _short(x) -> str:
    if isinstance(x, list):
        return "[" + ",".join(_short(y) for y in x) + "]"
    return f"{x:.3g}" if isinstance(x, float) else str(x)
