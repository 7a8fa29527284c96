"""`mbmerge extract-lora`: a PEFT LoRA adapter from a base and a fine-tune (engine/adapters/extract_lora.py), with
mergekit-extract-lora's options."""
import json
from pathlib import Path

import click


@click.command("extract-lora")
@click.option("--base", "-b", required=True, type=click.Path(path_type=Path), help="The base model folder.")
@click.option("--model", "-m", required=True, type=click.Path(path_type=Path), help="The fine-tuned model folder.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="The adapter folder to write.")
@click.option("--max-rank", "--rank", "-r", default=128, show_default=True, type=click.IntRange(1),
              help="Rank of each weight's LoRA (smaller where the weight is smaller).")
@click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True,
              help="Split the singular values between A and B (sqrt each) instead of putting them in A.")
@click.option("--embed-lora/--no-embed-lora", default=False, show_default=True,
              help="Decompose the embeddings and the head too, instead of saving them whole (modules_to_save).")
@click.option("--save-module", "modules_to_save", multiple=True, help="A module saved whole (repeatable).")
@click.option("--include-regex", "-i", "include", multiple=True, help="Extract only modules matching (repeatable).")
@click.option("--exclude-regex", "-e", "exclude", multiple=True, help="Leave out modules matching (repeatable).")
@click.option("--sv-epsilon", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Drop singular values at or below this.")
@click.option("--skip-undecomposable", is_flag=True, help="Leave out 1-D weights (norms) instead of saving them whole.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier mbmerge output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract_lora(base, model, out, max_rank, distribute_scale, embed_lora, modules_to_save, include, exclude,
                 sv_epsilon, skip_undecomposable, overwrite, quiet):
    """Extract a rank-r LoRA adapter (a PEFT folder) from BASE and the fine-tuned MODEL, tensor by tensor."""
    from ..engine.adapters.extract_lora import Options, extract_lora as run        # torch, from here on
    options = Options(max_rank=max_rank, distribute_scale=distribute_scale, embed_lora=embed_lora,
                      modules_to_save=tuple(modules_to_save), include=tuple(include), exclude=tuple(exclude),
                      sv_epsilon=sv_epsilon, skip_undecomposable=skip_undecomposable, progress=not quiet)
    path = run(base, model, out, options, overwrite)
    if not quiet:
        click.echo(f"LoRA adapter written to {path} (relative errors per tensor in {path / 'mbmerge.json'})")
        unchanged = json.loads((path / "mbmerge.json").read_text())["unchanged"]
        if unchanged:
            click.echo(f"{len(unchanged)} tensor(s) equal to the base's left out (no LoRA, no copy), e.g. "
                       f"{unchanged[0]}; listed under 'unchanged' in mbmerge.json")
