"""`mbmerge tune`: the best parameters of a method on validation data (grid search), or a Hi-Merging
merge (`--method hi_merging`), written to OUT with a table of every candidate and the time split."""
from pathlib import Path

import click

from .. import methods
from .options import listed as _listed, method_param_options


@click.command("tune")
@click.option("--method", "-m", required=True, help="A method (default grids: task_arithmetic, ties, dare_ties, "
              "dare_linear, consensus, localize_stitch; others with --grid), or hi_merging.")
@click.option("--experts", "-e", required=True, help="Comma-separated folders, hub ids or domains.")
@click.option("--base", "-b", help="Base model (default: the built-in family).")
@click.option("--grid", "grid_text", help="'name=v1,v2 name=v1,v2': the candidates (default: MergeBench's grid; "
              "hi_merging: 'p=... s=...').")
@click.option("--validate", help="One validation domain per expert (default: each expert's own domain).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="The best merge's folder.")
@click.option("--stats", "stats_dirs", help="Data-aware methods: one statistics folder per expert.")
@click.option("--data", help="Data-aware methods: one data source per expert (default for domains: their own).")
@click.option("--jobs", default=1, show_default=True, help="Candidates merged and scored at once (processes).")
@click.option("--max-evals", type=int, help="hi_merging: at most this many (model, domain) evaluations.")
@click.option("--limit", type=int, help="Validation examples per domain (default: all).")
@click.option("--batch-size", default=64, show_default=True, help="lm-eval generation batch size.")
@click.option("--protocol", type=click.Choice([*sorted(methods.PROTOCOLS), "none"]), default="mergebench",
              show_default=True, help="The candidates' protocol (mergebench: TIES sum, embeddings kept, ...).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", "-q", is_flag=True)
@method_param_options
def tune(method, experts, base, grid_text, validate, out, stats_dirs, data, jobs, max_evals, limit, batch_size,
         protocol, overwrite, quiet, **params):
    """Score candidate merges on validation data and write the best."""
    from ..tune import search
    experts, validate = _listed(experts), _listed(validate)
    fixed = {k: v for k, v in params.items() if v is not None}
    grid = search.parse_grid(grid_text) if grid_text else None
    log = None if quiet else (lambda msg: click.echo(msg, err=True))
    kw = dict(experts=experts, base=base, out=out, validate=validate, limit=limit, batch_size=batch_size,
              overwrite=overwrite, progress=log)
    if method == "hi_merging":   # sequential: each stage depends on the last
        from ..tune.hi_run import hi_merge
        record = hi_merge(grid=grid, max_evals=max_evals, **kw)
    else:
        record = search.tune(method, grid=grid, jobs=jobs, protocol=None if protocol == "none" else protocol,
                             stats_folders=_listed(stats_dirs), data=_listed(data), **kw, **fixed)
    if record.get("best", {}).get("note"):     # a warning, not progress: said even with --quiet
        click.echo(f"mbmerge: warning: {record['best']['note']}", err=True)
    if not quiet:
        click.echo(search.table(record) if method != "hi_merging" else record["summary"])
        click.echo(f"\nbest merge written to {out} (all candidates: {Path(out) / 'tune.json'})")
