"""`mbmerge stats`: one expert's data statistics (Fisher diagonal, RegMean Grams, trained stitch
masks) into a folder that `mbmerge --method fisher|regmean|localize_stitch_trained --stats` streams;
and the data options that `mbmerge merge --data` shares."""
from pathlib import Path

import click

from .. import methods
from .options import param_options
from ..common.names import DOMAIN_ALIASES, is_domain
from ..engine.inputs.resolve import resolve

KIND_PARAMS = {kind: methods.collection_params(kind) for kind in ("fisher", "gram", "mask")}
ALL_PARAMS = {n: p for ps in KIND_PARAMS.values() for n, p in ps.items()}


def data_options(fn):
    """How to read and run the data: shared by `stats` and `merge --data`."""
    for option in reversed([
        click.option("--split", default="validation", show_default=True,
                     help="Split of a zoo domain, JSON object key or hub split (the only one if absent)."),
        click.option("--data-format", help="PROMPT_FIELD,RESPONSE_FIELD, e.g. question,solution "
                     "(default: detect MergeBench's *_val schemas)."),
        click.option("--max-length", default=2048, show_default=True, help="Tokens kept per example."),
        click.option("--data-seed", default=0, show_default=True, help="Row shuffle and Fisher label draws."),
        click.option("--stats-batch-size", type=int, help="Examples per forward (fisher 1, gram and mask 8)."),
        click.option("--stats-dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="The model's dtype while collecting (float32 on CPU, bfloat16 on CUDA)."),
    ]):
        fn = option(fn)
    return fn


def data_kwargs(split, data_format, max_length, data_seed, stats_batch_size, stats_dtype) -> dict:
    return dict(split=split, data_format=data_format, max_length=max_length, seed=data_seed,
                batch_size=stats_batch_size, dtype=stats_dtype)


@click.command("stats")
@click.option("--kind", required=True, type=click.Choice(list(KIND_PARAMS)),
              help="fisher (for --method fisher), gram (regmean), mask (localize_stitch_trained).")
@click.option("--model", "ref", required=True, help="The expert: folder, hub id, or a zoo domain (math, ...).")
@click.option("--base", help="The base it was fine-tuned from (mask; default for a zoo domain: the zoo's).")
@click.option("--data", help="Zoo domain, .json/.jsonl file or hub dataset (default for a domain: its own).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Statistics folder.")
@param_options(ALL_PARAMS.values())
@data_options
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--memory-budget", default="4GB", show_default=True,
              help="Accumulators held at once; more is collected in more passes over the data.")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
@click.option("--quiet", "-q", is_flag=True)
def stats(kind, ref, base, data, out, device, memory_budget, overwrite, quiet, **kw):
    """Collect one expert's statistics on its data (one model in memory at a time)."""
    from ..stats.collect import CollectOptions, collect
    params = {}
    for name, value in [(n, kw.pop(n)) for n in ALL_PARAMS]:   # what is left in kw: the data options
        if value is None:
            continue
        if name not in KIND_PARAMS[kind]:
            raise click.UsageError(f"--{name.replace('_', '-')} does not apply to --kind {kind}")
        value = ALL_PARAMS[name].coerce(value, kind)
        params[name] = value[0] if isinstance(value, list) else value   # one expert: one value
    if is_domain(ref) and base is None:
        from ..library import default_family
        zoo = default_family()
        model, base, data = zoo / DOMAIN_ALIASES[ref.lower()], str(zoo / "base"), data or DOMAIN_ALIASES[ref.lower()]
    else:
        model = resolve(ref, f"model {ref}", base).path
    if data is None:
        raise click.UsageError("--data is required unless --model is a zoo domain")
    base_path = resolve(base, "base").path if base else None
    options = CollectOptions(device=device, memory_budget=memory_budget, progress=not quiet, **data_kwargs(**kw))
    folder = collect(kind, model, data, out, base=base_path, params=params, options=options, overwrite=overwrite)
    if not quiet:
        click.echo(f"{kind} statistics written to {folder}")
