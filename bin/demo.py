"""`mbmerge demo`: the whole system on the mini zoo, with no network and no GPU. Builds the zoo if
missing, merges its five experts with every method that takes five (the data-aware ones on
statistics of each expert on its own domain's validation split), evaluates the base, the experts,
the multi-task model and every merge through the eval layer, and writes report.md, report.json and
plots (MergeBench's views: scores, normalised performance vs merge time, forgetting)."""
import json
from dataclasses import replace
from pathlib import Path

import click

from .. import methods
from ..common.domains import DOMAINS
from ..common.errors import MbmergeError
from ..common.progress import Progress
from ..engine.inputs.stats_folders import read_card
from ..eval import harness
from ..eval.report import np_text, undefined_note, write_report
from ..eval.zoo import build_zoo
from ..library import collect_statistics, merge

# --micro: statistics on a handful of examples per expert (the statistics cache keys on the count, so
# they never stand for a full run's 1000) and the first MICRO["limit"] test examples of each domain,
# so the whole demo takes seconds
MICRO = {"samples": 8, "limit": 48}


def five_expert_methods() -> list[str]:
    return [m.name for m in methods.REGISTRY.values() if m.min_experts <= 5 <= (m.max_experts or 5)]


def _row(model: str, kind: str, r: dict, stats_seconds: float | None = None, tuning: dict | None = None) -> dict:
    """A report row; tuning: a tune record, whose merge and validation times replace the merge's own."""
    merge_seconds = tuning["seconds"]["merge"] if tuning else (r["merge"] or {}).get("wall_seconds")
    return {"model": model, "kind": kind, "scores": {d: r["scores"].get(d) for d in DOMAINS},
            "general": r["scores"].get("general"), "normalised": r["normalised_performance"]["mean"],
            "forgetting": r["forgetting"]["mean"], "merge_seconds": merge_seconds, "stats_seconds": stats_seconds,
            "validation_seconds": tuning["seconds"]["validation"] if tuning else None}


TUNED = ("task_arithmetic", "ties", "dare_ties", "hi_merging")


def _tune_all(zoo: Path, out: Path, names: list[str], limit, batch_size, max_evals, quiet, search, ray=None):
    """(name, its folder under OUT/tuned, tune record) of each method tuned as `search` says (tune.search.Search:
    default MergeBench's grid; its grid and per_expert parameters taken by each method as far as it has them),
    or of Hi-Merging, on the validation split of each expert's domain. A method that cannot be tuned on this
    zoo (Hi-Merging where every expert scores 0 on its own domain) is left out with a warning, not the whole
    demo."""
    from ..tune.hi_merging import HiSearch
    from ..tune.hi_run import hi_merge
    from ..tune.runners import RunnerSettings
    from ..tune.score import Candidate, Validation
    from ..tune.search import tune
    experts, base = [str(zoo / d) for d in DOMAINS], str(zoo / "base")
    kw = dict(overwrite=True, progress=None if quiet else (lambda m: click.echo(m, err=True)))
    _check_grid(search, names)
    for name in names:
        folder = out / "tuned" / (name + search_tag(search))
        try:
            v = Validation(tuple(DOMAINS), limit=limit, batch_size=batch_size)
            if name == "hi_merging":
                record = hi_merge(experts=experts, base=base, out=folder, validation=v,
                                  search=HiSearch(max_evals=max_evals), **kw)
            else:
                method, steps = _steps(name)
                if "weights_from" in steps:
                    raise MbmergeError("a tune searches the weights; +nan sets them")
                record = tune(Candidate(method=method, experts=tuple(experts), base=base,
                                        calibrate=steps.pop("calibrate", None), params=steps), out=folder,
                              validation=replace(v, device=None),     # None: cuda when the trials hold GPUs
                              search=_taken(search, method), runner=RunnerSettings(ray=ray), **kw)
        except MbmergeError as e:
            click.echo(f"mbmerge: warning: {name} (tuned) left out: {e}", err=True)
            continue
        if record.get("best", {}).get("note"):
            click.echo(f"mbmerge: warning: {name} (tuned): {record['best']['note']}", err=True)
        yield name, folder, record


def search_tag(search) -> str:
    """The tuned folders' suffix naming a search that is not MergeBench's grid: '-tpe-l2-np,forgetting'."""
    parts = [search.sampler] if search.sampler != "grid" else []
    parts += [f"l{search.per_layer}"] if search.per_layer > 1 else []
    parts += [f"e-{'+'.join(search.per_expert)}"] if search.per_expert else []
    parts += [search.objective] if search.objective != "np" else []
    parts += [f"f{search.max_forgetting:g}"] if search.max_forgetting is not None else []
    return "".join(f"-{p}" for p in parts)


def search_label(search, record: dict) -> str:
    """A tuned row's label: 'tuned', or the search: 'tuned: tpe, 50 trials, per layer (2 groups), ...'."""
    if search.sampler == "grid" and search.objective == "np":
        return "tuned" + (f": {len(record['trials'])} grid points" if search.grid else "")
    words = [search.sampler, f"{len(record['trials'])} trials"]
    words += [f"per expert {', '.join(search.per_expert)}"] if search.per_expert else []
    words += [f"per layer ({search.per_layer} groups)"] if search.per_layer > 1 else []
    words += [f"objectives {search.objective}"] if search.objective != "np" else []
    words += [f"forgetting at most {search.max_forgetting:g}"] if search.max_forgetting is not None else []
    return "tuned: " + ", ".join(words)


def _taken(search, method: str):
    """The search as METHOD takes it: the grid's and per_expert's parameters it has (default: its grid)."""
    have = {p.name for p in methods.get(method).params}
    grid = {k: v for k, v in search.grid.items() if k in have} if search.grid else None
    return replace(search, grid=grid or None, per_expert=tuple(k for k in search.per_expert if k in have))


def _check_grid(search, names: list[str]) -> None:
    """A --grid or --per-expert parameter that none of the tuned methods takes is a typo: one line."""
    have = {p.name for n in names if n != "hi_merging" for p in methods.get(_steps(n)[0]).params}
    unknown = [k for k in [*(search.grid or {}), *search.per_expert] if k not in have]
    if unknown:
        raise click.UsageError(f"--grid/--per-expert {unknown[0]}: none of the tuned methods ({', '.join(names)}) "
                               f"takes it")


def _settings(name: str, micro: bool) -> dict:
    """A method's demo parameters; with --micro, its statistics on MICRO's few examples."""
    m = methods.get(name)
    return {**m.demo, **({"samples": MICRO["samples"]} if micro and m.data_statistic else {})}


def _statistics(name: str, zoo: Path, micro: bool, progress: bool) -> tuple[list[Path] | None, float | None]:
    """A data-aware method's statistics of each expert on its own domain (collected once, cached)
    and the seconds collecting them took (from their cards, so a cached run still reports them)."""
    if methods.get(name).data_statistic is None:
        return None, None
    folders = collect_statistics(name, [zoo / d for d in DOMAINS], list(DOMAINS), base=zoo / "base",
                                 params=_settings(name, micro), progress=progress)
    return folders, sum(read_card(f)["seconds"] for f in folders)


# a method's steps in --methods: NAME+svc (SVC after it; alpha 1.0 after TSV, FusionBench's choice, else 0.1)
# and NAME+nan (its weights from the experts' norms)
STEPS = {"svc": lambda name: {"calibrate": "svc", **({"svc_alpha": 1.0} if name.startswith("tsv") else {})},
         "nan": lambda name: {"weights_from": "nan"}}


def _steps(name: str) -> tuple[str, dict]:
    """'ties+svc' -> ("ties", the merge's keyword arguments for SVC); a step that is not one: one line."""
    method, *steps = name.split("+")
    bad = [x for x in steps if x not in STEPS]
    if bad:
        raise click.UsageError(f"--methods {name}: no step {bad[0]!r} (after a method: {', '.join(STEPS)})")
    return method, {k: v for x in steps for k, v in STEPS[x](method).items()}


def _merged_row(name: str, zoo: Path, out: Path, evaluation: harness.EvalSettings, micro: bool, progress: bool) -> dict:
    """Merge the zoo's five experts with a method (its demo settings, and steps: NAME+svc) into
    OUT/merges/NAME, evaluate the merge: its report row (runs in this process or as a Ray task)."""
    folder = out / "merges" / name
    method, steps = _steps(name)
    stats, stats_seconds = _statistics(method, zoo, micro, progress)
    merge(method, base=str(zoo / "base"), experts=[str(zoo / d) for d in DOMAINS], out=folder, overwrite=True,
          progress=False, protocol="mergebench", stats_folders=stats, **_settings(method, micro), **steps)
    return _row(name.replace("+", " + "), "merge", harness.report(folder, zoo=zoo, settings=evaluation), stats_seconds)


def _moe_row(zoo: Path, out: Path, evaluation: harness.EvalSettings) -> dict | None:
    """The five experts routed instead of merged: a MoE (top-2, each expert routed by the hidden states of its
    domain's validation prompts) in OUT/moe, its report row; None, with a warning, where no MoE architecture
    takes the zoo's models (Gemma-2)."""
    from ..engine.moe.assemble import MoeRun
    from ..engine.moe.recipe import MoeExpert, MoeRecipe
    from ..engine.spec import RunOptions
    from ..library import moe
    recipe = MoeRecipe(base=None, experts=tuple(MoeExpert(source=d) for d in DOMAINS), experts_per_token=2)
    try:
        moe(recipe, out / "moe", MoeRun(run=RunOptions(overwrite=True, progress=False)), family=zoo)
    except MbmergeError as e:
        click.echo(f"mbmerge: warning: the MoE row is left out: {e}", err=True)
        return None
    return _row("moe (top-2 of 5)", "moe", harness.report(out / "moe", zoo=zoo, settings=evaluation))


def _rows(zoo: Path, out: Path, names: list[str], evaluation: harness.EvalSettings, micro: bool, quiet: bool,
          ray_address, with_moe: bool = True):
    """The report's rows: the base, the experts and the multi-task model evaluated, then each method's
    merge and the MoE; without quiet, 'k of N' on stderr as each is done, with an estimate of the time left."""
    refs = [("base", "base"), *[(d, "expert") for d in DOMAINS], ("multitask", "multitask")]
    say = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    steps, rows = Progress(total=len(refs) + len(names) + with_moe, say=say, prefix="mbmerge demo"), []
    for name, kind in refs:
        rows.append(_row(name, kind, harness.report(zoo / name, zoo=zoo, settings=evaluation)))
        steps.step(f"{name} evaluated")
    if ray_address:     # every method at once, the experts' scores above already in the eval cache
        from ..tune.runners import start_ray
        ray = start_ray(ray_address)
        task = ray.remote(_merged_row).options(num_cpus=1, max_retries=2)
        merged = ray.get([task.remote(name, zoo, out, evaluation, micro, False) for name in names])
    else:
        merged = (_merged_row(name, zoo, out, evaluation, micro, not quiet) for name in names)
    for row in [*merged, _moe_row(zoo, out, evaluation) if with_moe else None]:
        if row is not None:
            rows.append(row)
            steps.step(f"{row['model']}: normalised performance {np_text(row, rows, list(DOMAINS))}")
    return rows


@click.command("demo")
@click.option("--out", "-o", default="mbmerge-demo", show_default=True, type=click.Path(path_type=Path),
              help="Folder for the merges and the report.")
@click.option("--family", type=click.Choice(["llama", "gemma2"]), default="llama", show_default=True)
@click.option("--micro", is_flag=True, help=f"The micro zoo, statistics on {MICRO['samples']} examples per expert "
              f"and {MICRO['limit']} test examples per task (seconds; for tests, not for conclusions).")
@click.option("--methods", "names", default="all", show_default=True, help="Comma-separated methods, or all; "
              "NAME+svc adds SVC after the method, NAME+nan takes its weights from the experts' norms (NAN).")
@click.option("--limit", type=int, help="Evaluate on at most N examples per task [default: all 100; "
              f"--micro: {MICRO['limit']}].")
@click.option("--batch-size", default=64, show_default=True, help="lm-eval generation batch size.")
@click.option("--cache", type=click.Path(path_type=Path), help="Zoo cache folder.")
@click.option("--tune", "tuned", is_flag=True, help="Also tune methods on the validation split (MergeBench's "
              "grids) and run Hi-Merging; adds their rows, with merge and validation times.")
@click.option("--tune-methods", default=",".join(TUNED), show_default=True, help="--tune: which (NAME+svc: each "
              "candidate with SVC after the method).")
@click.option("--max-evals", default=240, show_default=True, help="--tune: Hi-Merging's evaluation budget.")
@click.option("--prune", type=click.Choice(["none", "halving"]), default="none", show_default=True,
              help="--tune: successive halving of the grids' candidates (see mbmerge tune).")
@click.option("--sampler", type=click.Choice(["grid", "tpe", "cmaes", "nsga2"]), default="grid", show_default=True,
              help="--tune: how each method is searched (see mbmerge tune); a search reads --grid as ranges.")
@click.option("--grid", "grid_text", help="--tune: 'name=v1,v2 ...' or ranges 'name=low:high ...'; each method takes "
              "the parameters it has [default: its MergeBench grid].")
@click.option("--trials", type=int, help="--tune with a search sampler: its trials (a rerun with more resumes it).")
@click.option("--per-expert", help="--tune: parameters searched one value per expert.")
@click.option("--per-layer", type=click.IntRange(1), default=1, show_default=True,
              help="--tune: search each range per group of this many groups of layers (mergekit recipes).")
@click.option("--objective", default="np", show_default=True, help="--tune: np, or np,forgetting for a Pareto front.")
@click.option("--max-forgetting", type=float, help="--tune with np,forgetting: the best NP forgetting at most this.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              help="Merge and evaluate the methods, and run the tuning trials, as Ray tasks: bare --ray on a local "
              "Ray, --ray ADDRESS on a cluster (the output folder must be one every node writes).")
@click.option("--moe/--no-moe", "with_moe", default=True, show_default=True,
              help="Also route the five experts as a Mixture of Experts (top-2, mbmerge moe): its row beside the merges.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--verbose", "-v", is_flag=True, help="Show lm-eval's own logging and progress bars.")
def demo(out, family, micro, names, limit, batch_size, cache, tuned, tune_methods, max_evals, prune, sampler, grid_text,
         trials, per_expert, per_layer, objective, max_forgetting, ray_address, with_moe, quiet, verbose):
    """Merge the mini zoo's experts with every method, evaluate, and report."""
    if tuned or ray_address:
        from ..tune import require_extra
        require_extra()
    zoo = build_zoo(family, "micro" if micro else "full", cache, progress=not quiet)
    names = five_expert_methods() if names == "all" else names.split(",")
    for name in names:
        _steps(name)        # a mistyped step said before anything runs
    limit = MICRO["limit"] if limit is None and micro else limit
    evaluation = harness.EvalSettings(limit=limit, batch_size=batch_size, verbose=verbose)
    search = None
    if tuned:
        from ..tune.search import Search
        from ..tune.space import parse_grid
        search = Search(grid=parse_grid(grid_text) if grid_text else None, sampler=sampler, trials=trials,
                        per_expert=tuple(p for p in (per_expert or "").split(",") if p), per_layer=per_layer,
                        objective=objective, max_forgetting=max_forgetting, prune=None if prune == "none" else prune)
    rows = _rows(zoo, out, names, evaluation, micro, quiet, ray_address, with_moe)
    for name, folder, record in (_tune_all(zoo, out, tune_methods.split(","), limit, batch_size, max_evals, quiet,
                                           search, ray_address) if tuned else []):
        label = "tuned" if name == "hi_merging" else search_label(search, record)
        rows.append(_row(f"{name.replace('+', ' + ')} ({label})", "tuned", harness.report(folder, zoo=zoo, settings=evaluation),
                         tuning=record))
    if ray_address:
        from ..tune.runners import start_ray
        start_ray(ray_address).shutdown()
    zoo_record = json.loads((zoo / "zoo.json").read_text()) if (zoo / "zoo.json").exists() else {}
    settings = {m.name: m.demo for m in methods.REGISTRY.values() if m.demo}
    preface = (f"Zoo: `{zoo}` ({family}, {'micro' if micro else 'full'}; {zoo_record.get('parameters', '?')} "
               f"parameters). Merges: all five experts, `--protocol mergebench`, MergeBench's example "
               f"settings ({json.dumps(settings)}). Normalised performance: mean over domains of "
               f"score / the domain expert's score. Forgetting: relative drop of the general-knowledge "
               f"score against the base. Evaluated on {limit or 'all'} test examples per domain"
               + (f"; statistics on {MICRO['samples']} examples per expert." if micro else "."))
    table = write_report(rows, list(DOMAINS), out, preface)
    if not quiet:
        click.echo(table)
        note = undefined_note(rows, list(DOMAINS))
        if note:
            click.echo(f"\n{note}")
        click.echo(f"\nreport: {out / 'report.md'}")
