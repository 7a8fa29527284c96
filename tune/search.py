"""`mbmerge tune`: grid search of a method's parameters on validation data. Every candidate is an
independent streamed merge scored through the eval layer (score.py, cached per domain); the best
by mean normalised performance is merged again into the output folder, with a table of all
candidates and MergeBench's time split: merge (algorithm) time against validation time.

Candidates run in-process, or in `jobs` worker processes (each with its share of the cores); a
Candidate is plain data, so a pool of other machines could take them the same way.
"""
import itertools
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from .. import methods
from ..engine import api
from ..common.errors import BadParameter
from ..common.names import domain_names
from . import score as scoring
from .score import Candidate, ScoreCache, Validation, normalised

def parse_grid(text: str) -> dict[str, list[str]]:
    """'scale=0.2,0.4 density=0.1,0.2' -> {"scale": ["0.2", "0.4"], "density": ["0.1", "0.2"]}
    (values are checked and converted by the method's parameters)."""
    grid = {}
    for item in text.split():
        name, sep, values = item.partition("=")
        if not sep or not name or not values:
            raise BadParameter(f"--grid item {item!r}: write name=v1,v2,... (e.g. scale=0.2,0.4)")
        grid[name.replace("-", "_")] = values.split(",")
    if not grid:
        raise BadParameter("--grid is empty")
    return grid


def default_grid(method: str) -> dict[str, list]:
    """MergeBench's grid of the method (its registry row)."""
    grid = methods.get(method).grid
    if grid is None:
        known = [m.name for m in methods.REGISTRY.values() if m.grid]
        raise BadParameter(f"no default grid for {method}; give one with --grid 'name=v1,v2 ...' "
                           f"(default grids: {', '.join(known)})")
    return grid


def typed(method: str, grid: dict) -> dict[str, list]:
    """The grid's values as the method's parameter types (one value each, per-expert ones too)."""
    known = {p.name: p for p in methods.get(method).params}
    unknown = [k for k in grid if k not in known]
    if unknown:
        raise BadParameter(f"method {method} has no parameter {unknown[0]!r} to tune (it takes: {', '.join(known)})")
    return {k: [_one(known[k].coerce(v, method)) for v in values] for k, values in grid.items()}


def _one(value):
    """A per-expert parameter's single value (grids broadcast one value to every expert)."""
    return value[0] if isinstance(value, list) else value


def points(grid: dict) -> list[dict]:
    """Every combination, the last parameter varying fastest."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*grid.values())]


@dataclass(kw_only=True)
class Row:
    params: dict
    scores: dict
    np: float | None
    merge_seconds: float
    validation_seconds: float
    cached: bool


def score_all(candidates: list[Candidate], v: Validation, jobs: int = 1, cache: ScoreCache | None = None,
              progress=None) -> list[Row]:
    """Each candidate's validation scores on every domain of v: from the cache, or merged and scored
    (in `jobs` processes); new scores are cached as they come."""
    cache = cache or ScoreCache()
    references = [scoring.validation_scores(e.path, v, [d], cache=True)[d]
                  for e, d in zip(candidates[0].sources()[1], v.domains)]
    keys, found = zip(*(cache.lookup(c, v, v.domains) for c in candidates))
    todo = [i for i, f in enumerate(found) if None in f.values()]
    for i, result in _map(candidates, todo, v, jobs):
        found[i].update(cache.store(keys[i], result))
        np = normalised(result["scores"], references, v)
        progress and progress(f"candidate {i + 1}/{len(candidates)} {candidates[i].params}: NP "
                              f"{'—' if np is None else f'{np:.3f}'}")
    rows = []
    for i, (c, f) in enumerate(zip(candidates, found)):
        scores = {d: e["score"] for d, e in f.items()}
        rows.append(Row(params=c.params, scores=scores, np=normalised(scores, references, v),
                        merge_seconds=f[v.domains[0]]["merge_seconds"],
                        validation_seconds=sum(e["validation_seconds"] for e in f.values()), cached=i not in todo))
    return rows


def _map(candidates, todo, v, jobs):
    """(index, run result) for the candidates in `todo`, in-process or over `jobs` processes."""
    if jobs <= 1:
        for i in todo:
            yield i, scoring.run(candidates[i], v, v.domains)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker, initargs=(threads,)) as pool:
        futures = {i: pool.submit(scoring.run, candidates[i], v, v.domains) for i in todo}
        for i, f in futures.items():
            yield i, f.result()


def _worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def tune(method: str, *, experts, out, base: str | None = None, grid: dict | None = None,
         validate: list[str] | None = None, jobs: int = 1, protocol: str | None = "mergebench",
         limit: int | None = None, batch_size: int = 64, device: str = "cpu", overwrite: bool = False,
         progress=None, stats_folders: list | None = None, data: list | None = None, **params) -> dict:
    """Grid-search METHOD's parameters (grid: {name: values}; default: its registry row's grid) on the
    validation split of each expert's domain (validate; default: the experts' own domain names), merge
    the best into OUT, and return (and write to OUT/tune.json) every candidate's scores and the time split.
    params: fixed parameters of every candidate; stats_folders/data: a data-aware method's (see merge)."""
    started = time.perf_counter()
    v = Validation(tuple(validate or expert_domains(experts)), limit=limit, batch_size=batch_size, device=device)
    if len(v.domains) != len(experts):
        raise BadParameter(f"{len(v.domains)} validation domain(s) for {len(experts)} experts; give one per expert")
    grid = typed(method, grid or default_grid(method))
    template = Candidate(method=method, experts=tuple(experts), base=base, params=params, stats_folders=tuple(stats_folders or ()) or None,
                         data=tuple(data) if data else None, protocol=protocol)
    candidates = [replace(template, params={**params, **p}) for p in points(grid)]
    for c in candidates:
        c.merge_spec(Path(out))  # every candidate's parameters checked before anything runs
    rows = score_all(candidates, v, jobs, progress=progress)
    best = max(range(len(rows)), key=lambda i: (rows[i].np is not None, rows[i].np or 0, -i))
    final = time.perf_counter()
    api.run(candidates[best].spec(Path(out), overwrite=overwrite, resume=True))
    record = {"method": method, "grid": grid, "validate": list(v.domains), "limit": limit,
              "best": {"params": rows[best].params, "np": rows[best].np, **_undefined_note(rows)},
              "candidates": [vars(r) for r in rows],
              "seconds": {"merge": sum(r.merge_seconds for r in rows) + time.perf_counter() - final,
                          "validation": sum(r.validation_seconds for r in rows),
                          "this_run": time.perf_counter() - started},
              "evaluated": sum(not r.cached for r in rows), "cached": sum(r.cached for r in rows)}
    (Path(out) / "tune.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def _undefined_note(rows: list[Row]) -> dict:
    """{"note": ...} when no candidate has a normalised performance to choose by (NP divides by each
    expert's own score: every expert scoring 0 on its own domain, as the micro zoo's do, leaves it
    undefined), so "best" is only the first candidate; else {}."""
    if any(r.np is not None for r in rows):
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
    """Markdown: every candidate with its validation scores and NP (the best marked), then the time split."""
    domains = record["validate"]
    head = ["params", *domains, "NP", "merge s", "validation s", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in record["candidates"]:
        mark = "best" if r["params"] == record["best"]["params"] else ("cached" if r["cached"] else "")
        cells = [" ".join(f"{k}={v}" for k, v in r["params"].items() if k in record["grid"]),
                 *(f"{r['scores'][d]:.3f}" if r["scores"].get(d) is not None else "—" for d in domains),
                 f"{r['np']:.3f}" if r["np"] is not None else "—", f"{r['merge_seconds']:.2f}",
                 f"{r['validation_seconds']:.1f}", mark]
        lines.append("| " + " | ".join(cells) + " |")
    if record["best"].get("note"):
        lines.append(f"\nbest: {record['best']['note']}")
    s = record["seconds"]
    lines.append(f"\nmerge (algorithm) time {s['merge']:.1f} s, validation time {s['validation']:.1f} s "
                 f"({record['evaluated']} candidates evaluated, {record['cached']} from the cache)")
    return "\n".join(lines)
