"""`mbmerge zoo`: build (or find in the cache) the mini zoo and print its folder and margins (eval/zoo.py)."""
from pathlib import Path

import click

from ..eval.zoo import ZOO_FAMILIES, build_zoo, load_record, margins_table


@click.command("zoo")
@click.option("--family", type=click.Choice(ZOO_FAMILIES), default="llama", show_default=True,
              help="Architecture: LlamaForCausalLM or Gemma2ForCausalLM.")
@click.option("--micro", is_flag=True,
              help="The tiny zoo the tests use (~10 s to build; its experts beat the base by small margins).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              help="Cache root (default: MBMERGE_CACHE, else the user cache dir); the zoo goes under zoo/.")
@click.option("--quiet", "-q", is_flag=True, help="No training progress.")
def zoo(family, micro, cache, quiet):
    """Train the mini zoo on CPU: a base, one expert per MergeBench domain and a multi-task model.

    Deterministic and cached: a second run finds the folder and prints it again."""
    folder = build_zoo(family, "micro" if micro else "full", cache=cache, progress=not quiet)
    record = load_record(folder)
    click.echo(str(folder))
    click.echo(f"\n{family}-{record['size']}: {record['parameters']:,} parameters per model, "
               f"built in {record['timings']['total']:.0f} s; greedy scores on {record['eval']['n']} test "
               f"examples per domain\n")
    click.echo(margins_table(record))
