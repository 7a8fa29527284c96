"""`mbmerge tune`: the best parameters of a method on validation data (grid search), or a Hi-Merging
merge (`--method hi_merging`), written to OUT with a table of every candidate and the time split."""
from pathlib import Path

import click

from .. import methods
from ..engine.flags import WHAT
from .options import listed as _listed, method_param_options, spec_option


@click.command("tune")
@click.option("--method", "-m", required=True, help="A method (default grids: task_arithmetic, ties, dare_ties, "
              "dare_linear, consensus, localize_stitch; others with --grid), or hi_merging.")
@click.option("--experts", "-e", required=True, help="Comma-separated folders, hub ids or domains.")
@click.option("--base", "-b", help="Base model (default: the built-in family).")
@click.option("--grid", "grid_text", help="'name=v1,v2 ...': the candidates (default: MergeBench's grid; "
              "hi_merging: 'p=... s=...'); tpe, cmaes, nsga2: ranges 'name=low:high ...'.")
@click.option("--validate", help="One validation domain per expert (default: each expert's own domain).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="The best merge's folder.")
@click.option("--stats", "stats_dirs", help="Data-aware methods: one statistics folder per expert.")
@click.option("--data", help="Data-aware methods: one data source per expert (default for domains: their own).")
@click.option("--sampler", type=click.Choice(["grid", "tpe", "cmaes", "nsga2"]), default="grid", show_default=True,
              help="grid: every point of --grid; tpe, cmaes, nsga2: Optuna's samplers over ranges (--trials of them; "
              "tpe and nsga2 also for several objectives).")
@click.option("--objective", default="np", show_default=True,
              help="What the study optimises: np (normalised performance), forgetting (minimised; the zoo's general "
              "tasks), or lm-eval tasks NAME[:METRIC]+NAME... (their mean, maximised); several, comma-separated, "
              "make a Pareto front (e.g. np,forgetting).")
@click.option("--max-forgetting", type=float, help="With --objective np,forgetting: write the best NP among the "
              "trials that forget at most this.")
@click.option("--trials", type=int, help="tpe, cmaes, nsga2: how many trials the study runs (default 20).")
@click.option("--per-expert", help="tpe, cmaes, nsga2: parameters searched one value per expert (e.g. weights,density).")
@click.option("--per-layer", type=click.IntRange(1), default=1, show_default=True,
              help="tpe, cmaes, nsga2: cut the layers into this many groups and search every range once per group (and "
              "per expert for --per-expert ones); each trial, and the best merge's mbmerge_config.yml, is a mergekit "
              "recipe of that many slices (mergekit's per-tensor semantics).")
@click.option("--prune", type=click.Choice(["none", "halving"]), default="none", show_default=True,
              help="halving: score every candidate on 1/9 of the examples, keep the best third on 1/3, the best "
              "of those on all.")
@click.option("--storage", help="The study's database URL (default: SQLite in the mbmerge cache; any SQLAlchemy URL, "
              "e.g. postgresql://host/db, for many machines).")
@click.option("--study", "study_name", help="The study's name (default: one named by the settings: a rerun resumes).")
@click.option("--show", is_flag=True, help="Only print the study's trials and write its plot to OUT (runs nothing).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              help="Run trials as Ray tasks: bare --ray starts a local Ray; --ray ADDRESS joins a cluster "
              "(ray://host:10001 or auto).")
@click.option("--jobs", default=1, show_default=True, help="Trials at once on this machine (a local Ray, the cores "
              "shared out).")
@click.option("--cpus-per-trial", type=float, help="Ray: CPUs a trial holds (default: 1, or the cores over --jobs).")
@click.option("--gpus-per-trial", type=float, help="Ray: GPUs a trial holds (default: 1 when the cluster has GPUs).")
@click.option("--retries", default=2, show_default=True, help="Ray: times a trial whose worker died is run again.")
@click.option("--device", help="Where trials merge and score: cpu, cuda (default: cuda when trials hold GPUs).")
@click.option("--max-evals", type=int, help="hi_merging: at most this many (model, domain) evaluations.")
@click.option("--limit", type=int, help="Validation examples per domain (default: all).")
@click.option("--batch-size", default=64, show_default=True, help="lm-eval generation batch size.")
@spec_option(WHAT["calibrate"], type=click.Choice(sorted(methods.CALIBRATIONS)))
@click.option("--protocol", type=click.Choice([*sorted(methods.PROTOCOLS), "none"]), default="mergebench",
              show_default=True, help="The candidates' protocol (mergebench: TIES sum, embeddings kept, ...).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (not needed to rerun the same "
              "tune into its own output).")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--verbose", "-v", is_flag=True, help="Let Ray's own logging through (its start-up lines, workers' "
              "output).")
@method_param_options
def tune(method, experts, base, grid_text, validate, out, stats_dirs, data, sampler, objective, max_forgetting, trials,
         per_expert, per_layer, prune, storage, study_name, show, ray_address, jobs, cpus_per_trial, gpus_per_trial,
         retries, device, max_evals, limit, batch_size, calibrate, protocol, overwrite, quiet, verbose, **params):
    """Score candidate merges on validation data and write the best."""
    from ..tune import require_extra
    require_extra()
    from ..tune import search
    from ..tune.record import table
    from ..tune.runners import RunnerSettings
    from ..tune.score import Candidate, Validation
    from ..tune.space import parse_grid
    experts, validate = _listed(experts), _listed(validate)
    fixed = {k: v for k, v in params.items() if v is not None}
    grid = parse_grid(grid_text) if grid_text else None
    log = None if quiet else (lambda msg: click.echo(msg, err=True))
    domains = tuple(validate or search.expert_domains(experts))
    kw = dict(out=out, overwrite=overwrite, progress=log)
    if method == "hi_merging":   # sequential: each stage depends on the last
        from ..tune.hi_run import hi_merge, hi_search
        v = Validation(domains, limit=limit, batch_size=batch_size)
        record = hi_merge(experts=experts, base=base, validation=v, search=hi_search(grid, max_evals=max_evals),
                          storage=storage, **kw)
    else:
        stats_dirs, data = _listed(stats_dirs), _listed(data)
        template = Candidate(method=method, experts=tuple(experts), base=base, params=fixed,
                             stats_folders=tuple(stats_dirs) if stats_dirs else None,
                             data=tuple(data) if data else None, protocol=None if protocol == "none" else protocol,
                             calibrate=calibrate)
        v = Validation(domains, limit=limit, batch_size=batch_size, device=device)   # device None: tune picks
        how = search.Search(grid=grid, sampler=sampler, trials=trials, per_expert=tuple(_listed(per_expert) or ()),
                            per_layer=per_layer, objective=objective, max_forgetting=max_forgetting, prune=None if prune == "none" else prune, storage=storage, study=study_name)
        where = RunnerSettings(ray=ray_address, jobs=jobs, cpus_per_trial=cpus_per_trial,
                               gpus_per_trial=gpus_per_trial, retries=retries, verbose=verbose)
        record = search.tune(template, validation=v, search=how, runner=where, show=show, **kw)
        from ..tune.best import save_plots
        png, front_png = save_plots(Path(out), record)
    _warnings(record)
    if quiet:
        return
    if method == "hi_merging":
        click.echo(f"{record['summary']}\n\nbest merge written to {out} (every decision: {Path(out) / 'tune.json'})")
        return
    click.echo(table(record))
    pictured = f"NP against each parameter: {png}" if png else "no plot: no trial has an NP to show"
    pictured += f"; the Pareto front: {front_png}" if front_png else ""
    if show:
        click.echo(f"\n{pictured}")
        return
    written = "written to" if record["this_run"]["merged"] else "already in"
    click.echo(f"\nbest merge (trial {record['best']['number']}) {written} {out} (all trials: "
               f"{Path(out) / 'tune.json'}; {pictured})")


def _warnings(record: dict) -> None:
    """What the user must know, said on stderr even with --quiet."""
    failed = record.get("this_run", {}).get("failed")
    if failed:
        click.echo(f"mbmerge: warning: {len(failed)} trial(s) failed ({failed[0]}); run the command again to "
                   f"retry them", err=True)
    if (record.get("best") or {}).get("note"):
        click.echo(f"mbmerge: warning: {record['best']['note']}", err=True)
    if record.get("running"):      # --show reads a study that other processes still run
        click.echo(f"mbmerge: warning: trial(s) {', '.join(map(str, record['running']))} still run in another "
                   f"process: the best may change when they finish", err=True)
