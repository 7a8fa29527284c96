"""`mbmerge eval`: score a model folder on a family's domains with lm-eval, compare it with the
experts (normalised performance) and the base (forgetting), print the table (or the JSON report
with --json), write the JSON report to --out, and say each task's progress on stderr."""
import json
from pathlib import Path

import click

from ..eval import domain_tasks, harness
from ..eval.report import eval_table


@click.command("eval")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--domains", help="Comma-separated MergeBench domains [default: all five].")
@click.option("--family", default=domain_tasks.ZOO, show_default=True,
              help=f"Domain tasks and comparison models: {', '.join(domain_tasks.families())}.")
@click.option("--zoo", type=click.Path(file_okay=False, path_type=Path),
              help="Zoo folder (base/, one folder a domain) [default: the built zoo under the cache].")
@click.option("--limit", type=float, help="Examples per task (lm-eval --limit; < 1 is a fraction).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--chat-template", is_flag=True, help="Apply the tokenizer's chat template (MergeBench: off).")
@click.option("--dry-run", is_flag=True, help="Print the lm-eval tasks and settings; run nothing.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the JSON report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table (for scripts).")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.option("--verbose", "-v", is_flag=True, help="Show lm-eval's own logging and progress bars.")
def evaluate(model_dir, domains, family, zoo, limit, batch_size, device, chat_template, dry_run, out, as_json, quiet,
             verbose):
    """Evaluate MODEL_DIR: per-domain scores, normalised performance vs the experts, forgetting vs the base."""
    try:
        family = domain_tasks.family_of(family)
        doms = [d.strip() for d in domains.split(",") if d.strip()] if domains else None
        plan = domain_tasks.plan(family, doms)
    except ValueError as e:
        raise click.UsageError(str(e))
    limit = int(limit) if limit is not None and limit >= 1 else limit
    zoo = zoo or (_default_zoo() if family == domain_tasks.ZOO else None)
    if dry_run:
        compared = [d for d in plan if d != domain_tasks.GENERAL]
        base, experts = harness.comparison_refs(family, compared, zoo or Path("<zoo>"))
        click.echo(f"lm-eval model=hf pretrained={model_dir} device={device} batch_size={batch_size} limit={limit} "
                   f"apply_chat_template={chat_template} fewshot_as_multiturn={chat_template} "
                   f"add_bos_token={harness.bos_token(family)} log_samples=False")
        click.echo(domain_tasks.describe(plan))
        click.echo(f"experts: {', '.join(f'{d}={r}' for d, r in experts.items())}\nbase: {base}")
        return
    if not model_dir.is_dir():
        raise click.UsageError(f"{model_dir}: no such folder")
    if family == domain_tasks.ZOO and zoo is None:
        raise click.UsageError("no zoo found: build it with `mbmerge zoo` or pass --zoo DIR")
    settings = harness.EvalSettings(limit=limit, batch_size=batch_size, device=device, chat_template=chat_template,
                                    verbose=verbose)
    rep = harness.report(model_dir, settings=settings, family=family, domains=doms, zoo=zoo,
                         progress=None if quiet else (lambda line: click.echo(line, err=True)))
    text = json.dumps(rep, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    click.echo(text if as_json else f"{model_dir} ({family}, {limit or 'all'} examples a task)\n\n{eval_table(rep)}")


def _default_zoo() -> Path | None:
    """The built Llama zoo under the cache (full, else micro), if there is one."""
    from ..eval import zoo
    for size in ("full", "micro"):
        folder = zoo.zoo_folder("llama", size)
        if zoo.is_complete(folder):
            return folder
    return None
